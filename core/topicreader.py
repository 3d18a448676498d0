"""Reading a topic without a consumer group (no offsets committed): `callstream tail`,
replay's dry run, the dead-letter commands, and tests that look at what the ingress
published."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from core.kafkasettings import KafkaSettings


@dataclass(frozen=True, slots=True)
class RawRecord:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]

    @classmethod
    def of(cls, msg: Any) -> RawRecord:
        """From an aiokafka ConsumerRecord."""
        return cls(
            msg.topic,
            msg.partition,
            msg.offset,
            msg.timestamp,
            msg.key,
            msg.value,
            tuple(msg.headers or ()),
        )

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                # Kafka allows a header without a value.
                return None if value is None else value.decode(errors="replace")
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
                    yield RawRecord.of(msg)
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


async def read_range(
    kafka: KafkaSettings, topic: str, start: Mapping[int, int], end: Mapping[int, int]
) -> AsyncIterator[RawRecord]:
    """Yield every record with start[p] <= offset < end[p], partition by partition in offset
    order; a bounded read, so it ends even while producers keep writing."""
    wanted = {p: (start.get(p, 0), stop) for p, stop in end.items() if start.get(p, 0) < stop}
    if not wanted:
        return
    consumer = AIOKafkaConsumer(
        **kafka.client_kwargs() | {"client_id": "callstream-reader"},
        group_id=None,
        enable_auto_commit=False,
        # A start that retention deleted meanwhile resets to what is left, never past it
        # to the end (which would end the read with records unread).
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        tps = {p: TopicPartition(topic, p) for p in wanted}
        consumer.assign(list(tps.values()))
        for p, (first, _) in wanted.items():
            consumer.seek(tps[p], first)
        remaining = set(wanted)
        while remaining:
            batch = await consumer.getmany(*(tps[p] for p in remaining), timeout_ms=1000)
            for tp, records in batch.items():
                stop = wanted[tp.partition][1]
                for msg in records:
                    if msg.offset >= stop:
                        break
                    yield RawRecord.of(msg)
            # Positions, not the last offset seen: transaction markers and compaction leave
            # offsets that are never delivered.
            for p in list(remaining):
                if await consumer.position(tps[p]) >= wanted[p][1]:
                    remaining.discard(p)
    finally:
        await consumer.stop()
