"""The ingress's Kafka producer: one record or a batch, acknowledged by every in-sync replica
(acks=all, idempotent) or failed with a reason, and a fresh producer after any error that
leaves this one unable to deliver again. All aiokafka use of the ingress stays here;
ingress/publisher.py decides what happens when Kafka does not acknowledge.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from core.kafkasettings import KafkaSettings
from core.producer import durable_producer
from core.topicadmin import describe, ensure_topics
from ingress.outgoing import OutgoingRecord
from ingress.settings import Compression
from ingress.spool import finish_or_cancel

log = logging.getLogger(__name__)

# Many small records arrive at once under load; a few ms of linger lets them share a
# produce request without adding latency a caller would notice.
LINGER_MS = 5
# aiokafka keeps one open batch per partition and a send() that finds it full waits for it to
# go. A long call is a 105 kB record, so 256 kB batches held two and every send waited for a
# round trip: reports spooled under long calls fell from 10-60 % to 2-7 % at 1 MB
# (docs/performance.md: large reports). Under the broker's default message.max.bytes
# (1,048,588) even uncompressed.
MAX_BATCH_BYTES = 1_000_000
MAX_REQUEST_BYTES = 1_048_576
# Stopping: how long the producer may take to flush what is in flight.
FLUSH_GRACE_SECONDS = 10.0
CONNECT_GRACE_SECONDS = 20.0

# Errors after which this producer id can never deliver again, so only a new producer
# recovers (Kafka's own client resets its producer id here, KIP-360; aiokafka does not).
# The one seen in practice: a batch that waits out its timeout for a partition with no
# leader (a broker stopping) is failed inside aiokafka after it was given a sequence number
# but before it was sent, and the broker then refuses every later batch as out of order.
BROKEN_PRODUCER_STATE: tuple[type[KafkaError], ...] = (
    OutOfOrderSequenceNumber,
    UnknownProducerId,
    InvalidProducerEpoch,
    ProducerFenced,
)


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """How many leading records of a batch every in-sync replica has, and why the next one
    is not (None when all are)."""

    acked: int
    error: BaseException | None


class PublishUnavailable(Exception):
    """The record was not made durable; the ingress must not answer 2xx."""

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class KafkaNotAcknowledged(PublishUnavailable):
    """Kafka did not acknowledge in time, or failed in a way a retry may cure."""


class KafkaRejected(PublishUnavailable):
    """Kafka (or the client) refused the record for good: spooling it would only block the
    spool's head, so it is refused here instead."""


class RecordTooLarge(KafkaRejected):
    """The encoded report is over Kafka's record limit: no retry can ever succeed."""


class KafkaPublisher:
    def __init__(
        self,
        kafka: KafkaSettings,
        *,
        client_id: str = "callstream-ingress",
        compression: Compression = "zstd",
    ) -> None:
        self._kafka = kafka
        self._client_id = client_id
        self._compression = None if compression == "none" else compression
        self._producer: AIOKafkaProducer | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closed = asyncio.Event()
        self._last_failure: float | None = None
        self._last_ack: float | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._warned_durability = False

    async def start(self) -> None:
        """Connect in the background: the ingress must come up (and say it is not ready)
        even while Kafka is away. A configuration error still fails here, at start-up."""
        await self._new_producer().stop()
        self._connect_task = asyncio.create_task(self._connect_forever(), name="kafka-connect")

    def _new_producer(self) -> AIOKafkaProducer:
        return durable_producer(
            self._kafka,
            self._client_id,
            linger_ms=LINGER_MS,
            max_batch_size=MAX_BATCH_BYTES,
            max_request_size=MAX_REQUEST_BYTES,
            compression_type=self._compression,
            request_timeout_ms=15_000,
        )

    async def wait_connected(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        return self._connected.is_set()

    async def _connect_forever(self) -> None:
        delay = 0.2
        while not self._closed.is_set():
            producer = self._new_producer()
            try:
                await producer.start()
                await self._create_topics()
            except (KafkaError, OSError) as exc:
                await producer.stop()
                log.warning(
                    "kafka not reachable at %s (%s); retrying", self._kafka.bootstrap_servers, exc
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._closed.wait()
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
            await ensure_topics(
                self._kafka,
                [self._kafka.topic, self._kafka.events_topic, self._kafka.rejected_topic],
            )
            view = await describe(self._kafka, [self._kafka.topic])
        except KafkaError as exc:
            # Not fatal: a broker with auto-creation still takes the records.
            log.warning("could not create or describe topics (%s)", exc)
            return
        for topic in view.topics:
            weakness = topic.weakness()
            if weakness is not None and not self._warned_durability:
                self._warned_durability = True
                log.warning(
                    "ACKNOWLEDGED REPORTS CAN BE LOST: %s; a 2xx then promises less than it"
                    " says (docs/kafka.md: durability)",
                    weakness,
                )

    def check_fits(self, record: OutgoingRecord) -> None:
        """Raises KafkaRejected for a record the producer would refuse as too large, so such
        a record is refused up front and never reaches the spool."""
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(
            record.key, record.value, list(record.headers)
        )
        if size > MAX_REQUEST_BYTES:
            raise RecordTooLarge(
                f"the encoded report is {size} bytes, over Kafka's {MAX_REQUEST_BYTES}-byte limit"
            )

    async def publish(self, record: OutgoingRecord, timeout: float) -> None:
        """Returns once every in-sync replica has the record; raises KafkaNotAcknowledged if
        that does not happen within `timeout` (connecting included), KafkaRejected if Kafka
        refuses it for good."""
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
                assert self._producer is not None
                # Cancelling send() itself withdraws the record; once it returned, the record
                # is queued and a timeout only stops our waiting (it may still be delivered).
                future = await self._send(self._producer, record)
                await asyncio.shield(future)
        except TimeoutError as exc:
            self._last_failure = time.monotonic()
            raise KafkaNotAcknowledged(f"Kafka did not acknowledge within {timeout:g} s") from exc
        except KafkaError as exc:
            self._last_failure = time.monotonic()
            retry = exc.retriable or isinstance(exc, BROKEN_PRODUCER_STATE)
            error = KafkaNotAcknowledged if retry else KafkaRejected
            raise error(f"Kafka refused the record: {type(exc).__name__}") from exc

    async def publish_many(self, records: Sequence[OutgoingRecord], timeout: float) -> BatchOutcome:
        """Publish in order; say how many leading records every in-sync replica has.

        Records after the first unacknowledged one may have landed too; the caller sends
        them again (a duplicate, never a gap)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        futures: list[asyncio.Future[object]] = []
        error: BaseException | None = None
        try:
            async with asyncio.timeout_at(deadline):
                await self._connected.wait()
                assert self._producer is not None
                producer = self._producer
                for record in records:
                    futures.append(await self._send(producer, record))
        except (TimeoutError, KafkaError) as exc:
            error = exc
        if futures:
            # Nothing after the first failure can count as delivered, so there is no point
            # in waiting out the rest of the deadline for it.
            await asyncio.wait(
                futures,
                timeout=max(0.0, deadline - loop.time()),
                return_when=asyncio.FIRST_EXCEPTION,
            )
        acked = 0
        for future in futures:
            failure = _failure(future)
            if failure is not None:
                error = failure
                break
            acked += 1
        if acked < len(records):
            self._last_failure = time.monotonic()
            return BatchOutcome(acked, error or TimeoutError())
        return BatchOutcome(acked, None)

    async def _send(
        self, producer: AIOKafkaProducer, record: OutgoingRecord
    ) -> asyncio.Future[object]:
        """Hands `record` to `producer`. Every outcome is retrieved (none is logged as never
        retrieved, even after its caller stopped waiting), and one that shows the producer's
        state broken renews it."""
        future: asyncio.Future[object] = await producer.send(
            record.topic, record.value, key=record.key, headers=list(record.headers)
        )
        future.add_done_callback(functools.partial(self._settled, producer))
        return future

    def _settled(self, producer: AIOKafkaProducer, future: asyncio.Future[object]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            self._last_ack = time.monotonic()
        elif isinstance(exc, BROKEN_PRODUCER_STATE) and producer is self._producer:
            self._renew(producer, exc)

    def _renew(self, producer: AIOKafkaProducer, exc: BaseException) -> None:
        """Replace a producer whose id Kafka will not take records from any more. Callers
        wait for the new one as for a first connection; what the old one had not delivered
        is still theirs to spool or re-send."""
        if self._closed.is_set():
            return
        log.warning(
            "kafka refuses this producer's records for good (%s); starting a new producer",
            type(exc).__name__,
        )
        self._producer = None
        self._connected.clear()
        retire = asyncio.create_task(self._retire(producer), name="kafka-retire-producer")
        self._retiring.add(retire)
        retire.add_done_callback(self._retiring.discard)
        self._connect_task = asyncio.create_task(self._connect_forever(), name="kafka-connect")

    async def _retire(self, producer: AIOKafkaProducer) -> None:
        with contextlib.suppress(TimeoutError, KafkaError):
            async with asyncio.timeout(FLUSH_GRACE_SECONDS):
                await producer.stop()

    def acknowledged_since(self, moment: float) -> bool:
        """Whether Kafka acknowledged any record after `moment` (time.monotonic())."""
        return self._last_ack is not None and self._last_ack >= moment

    def connected(self) -> bool:
        return self._producer is not None

    def ready(self) -> bool:
        """Connected, and no failed publish in the last few seconds that Kafka has not
        made up for with an acknowledgement since."""
        if self._producer is None:
            return False
        failed = self._last_failure
        if failed is None or time.monotonic() - failed > 5.0:
            return True
        return self._last_ack is not None and self._last_ack > failed

    async def stop(self) -> None:
        self._closed.set()
        task = self._connect_task
        if task is not None and not task.done():
            # Let a connection attempt under way finish: aiokafka leaks the socket of a
            # connection cancelled half-way. Cancel only if the broker hangs the attempt.
            await finish_or_cancel(task, CONNECT_GRACE_SECONDS)
        if self._retiring:
            await asyncio.wait(set(self._retiring))
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            async with asyncio.timeout(FLUSH_GRACE_SECONDS):
                await producer.stop()
        except TimeoutError:
            # aiokafka retries an unacknowledged batch for as long as it is let, and with the
            # broker gone that is for ever. Nothing is lost by giving up: every report still
            # in flight here was answered "spooled" (the spool sends it on the next start) or
            # was refused, never acknowledged as being on Kafka.
            log.warning(
                "kafka took no acknowledgements for %.0f s while stopping; records still in"
                " flight were spooled or refused, and are not lost",
                FLUSH_GRACE_SECONDS,
            )


def _failure(future: asyncio.Future[object]) -> BaseException | None:
    if not future.done():
        return TimeoutError("Kafka did not acknowledge in time")
    if future.cancelled():
        return asyncio.CancelledError()
    return future.exception()
