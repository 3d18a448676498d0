"""The one component that makes a report durable before the ingress answers.

Today "durable" means acknowledged by every in-sync replica (acks=all, idempotent
producer). All aiokafka use of the ingress stays in this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from callstream.kafkaconfig import KafkaSettings
from callstream.topicadmin import ensure_topics

log = logging.getLogger(__name__)

# Many small records arrive at once under load; a few ms of linger lets them share a
# produce request without adding latency a caller would notice.
LINGER_MS = 5
MAX_BATCH_BYTES = 256 * 1024
MAX_REQUEST_BYTES = 1_048_576


@dataclass(frozen=True, slots=True)
class OutgoingRecord:
    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


class PublishUnavailable(Exception):
    """Kafka did not acknowledge in time; the record must not be reported as durable."""


class KafkaPublisher:
    def __init__(self, kafka: KafkaSettings, *, client_id: str = "callstream-ingress") -> None:
        self._kafka = kafka
        self._client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._last_failure: float | None = None

    async def start(self) -> None:
        """Connect in the background: the ingress must come up (and say it is not ready)
        even while Kafka is away. A configuration error still fails here, at start-up."""
        await self._new_producer().stop()
        self._connect_task = asyncio.create_task(self._connect_forever(), name="kafka-connect")

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **self._kafka.client_kwargs() | {"client_id": self._client_id},
            acks="all",
            enable_idempotence=True,
            linger_ms=LINGER_MS,
            max_batch_size=MAX_BATCH_BYTES,
            max_request_size=MAX_REQUEST_BYTES,
            compression_type="lz4",
            request_timeout_ms=15_000,
        )

    async def wait_connected(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        return self._connected.is_set()

    async def _connect_forever(self) -> None:
        delay = 0.2
        while True:
            producer = self._new_producer()
            try:
                await producer.start()
                await self._create_topics()
            except (KafkaError, OSError) as exc:
                await producer.stop()
                log.warning(
                    "kafka not reachable at %s (%s); retrying", self._kafka.bootstrap_servers, exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            except BaseException:
                await producer.stop()  # cancelled while connecting: leave nothing open
                raise
            self._producer = producer
            self._connected.set()
            log.info("connected to kafka at %s", self._kafka.bootstrap_servers)
            return

    async def _create_topics(self) -> None:
        try:
            await ensure_topics(self._kafka, [self._kafka.topic, self._kafka.events_topic])
        except KafkaError as exc:
            # Not fatal: a broker with auto-creation still takes the records.
            log.warning("could not create topics (%s)", exc)

    async def publish(self, record: OutgoingRecord, timeout: float) -> None:
        """Returns once every in-sync replica has the record; raises PublishUnavailable if
        that does not happen within `timeout` (connecting included)."""
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
                assert self._producer is not None
                future = await self._producer.send(
                    record.topic, record.value, key=record.key, headers=list(record.headers)
                )
                await future
        except TimeoutError as exc:
            self._last_failure = time.monotonic()
            raise PublishUnavailable(f"Kafka did not acknowledge within {timeout:g} s") from exc
        except KafkaError as exc:
            self._last_failure = time.monotonic()
            raise PublishUnavailable(f"Kafka refused the record: {type(exc).__name__}") from exc

    def ready(self) -> bool:
        """Connected, and no failed publish in the last few seconds."""
        if self._producer is None:
            return False
        return self._last_failure is None or time.monotonic() - self._last_failure > 5.0

    async def stop(self) -> None:
        """Flush whatever is in flight, then disconnect."""
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connect_task
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
