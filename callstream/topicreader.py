"""Reading a topic without a consumer group (no offsets committed): `callstream tail`,
replay's dry run, and tests that look at what the ingress published."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer

from callstream.kafkaconfig import KafkaSettings


@dataclass(frozen=True, slots=True)
class RawRecord:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode(errors="replace")
        return None


async def read_topic(
    kafka: KafkaSettings,
    topic: str,
    *,
    from_beginning: bool = True,
    idle_timeout: float | None = 5.0,
    limit: int | None = None,
) -> AsyncIterator[RawRecord]:
    """Yield records until `limit` is reached or nothing arrives for `idle_timeout` seconds
    (None: follow for ever)."""
    consumer = AIOKafkaConsumer(
        **kafka.client_kwargs() | {"client_id": "callstream-reader"},
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest" if from_beginning else "latest",
        # A topic created after we subscribed shows up within a second, not five minutes.
        metadata_max_age_ms=1000,
    )
    await consumer.start()
    try:
        # Without a group, subscribe() assigns every partition of the topic to us.
        consumer.subscribe([topic])
        if not await _wait_for_assignment(consumer, idle_timeout):
            return
        seen = 0
        while limit is None or seen < limit:
            batch = await consumer.getmany(timeout_ms=int((idle_timeout or 1.0) * 1000))
            if not batch:
                if idle_timeout is not None:
                    return
                continue
            for records in batch.values():
                for msg in records:
                    yield RawRecord(
                        msg.topic,
                        msg.partition,
                        msg.offset,
                        msg.timestamp,
                        msg.key,
                        msg.value,
                        tuple(msg.headers or ()),
                    )
                    seen += 1
                    if limit is not None and seen >= limit:
                        return
    finally:
        await consumer.stop()


async def _wait_for_assignment(consumer: AIOKafkaConsumer, timeout: float | None) -> bool:
    """False if the topic did not appear within `timeout` (None: wait for it for ever)."""
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    while not consumer.assignment():
        if deadline is not None and asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True
