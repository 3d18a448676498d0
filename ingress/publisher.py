"""The one component that makes a report durable before the ingress answers.

"Durable" means acknowledged by every in-sync replica (acks=all, idempotent producer) or,
when Kafka does not acknowledge within a short deadline, fsync'd in the local spool, from
which a drainer publishes it once Kafka is back (see docs/durability.md). All aiokafka use
of the ingress stays in this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

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
from core.logs import Throttled
from core.producer import durable_producer
from core.topicadmin import describe, ensure_topics

# Re-exported: the app, the tests and the spool's users know a record by this module.
from ingress.outgoing import OutgoingRecord as OutgoingRecord
from ingress.outgoing import decode_record as decode_record
from ingress.outgoing import encode_record as encode_record
from ingress.settings import Compression, IngressSettings
from ingress.spool import CrashPoint, Spool, Spooled, SpoolError, SpoolFull, crash
from ingress.telemetry import SpoolMetrics

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


Durable = Literal["kafka", "spool"]


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
        self._closing = False
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
        while not self._closing:
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
                producer = self._producer
                future = await producer.send(
                    record.topic, record.value, key=record.key, headers=list(record.headers)
                )
                self._watch(producer, future)
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
                    future = await producer.send(
                        record.topic, record.value, key=record.key, headers=list(record.headers)
                    )
                    self._watch(producer, future)
                    futures.append(future)
        except TimeoutError as exc:
            error = exc
        except KafkaError as exc:
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
            if not _succeeded(future):
                error = _failure(future)
                break
            acked += 1
        if acked < len(records):
            self._last_failure = time.monotonic()
            return BatchOutcome(acked, error or TimeoutError())
        return BatchOutcome(acked, None)

    def _watch(self, producer: AIOKafkaProducer, future: asyncio.Future[object]) -> None:
        """Every outcome is retrieved (none is logged as never retrieved, even after its
        caller stopped waiting), and one that shows the producer's state broken renews it."""
        future.add_done_callback(functools.partial(self._settled, producer))

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
        if self._closing:
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
        """Flush whatever is in flight, then disconnect."""
        self._closing = True
        self._closed.set()
        task = self._connect_task
        if task is not None and not task.done():
            # Let a connection attempt under way finish: aiokafka leaks the socket of a
            # connection cancelled half-way. Cancel only if the broker hangs the attempt.
            await asyncio.wait({task}, timeout=CONNECT_GRACE_SECONDS)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
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


def _succeeded(future: asyncio.Future[object]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _failure(future: asyncio.Future[object]) -> BaseException:
    if not future.done():
        return TimeoutError("Kafka did not acknowledge in time")
    if future.cancelled():
        return asyncio.CancelledError()
    exc = future.exception()
    assert exc is not None
    return exc


# -- Kafka, or the spool when Kafka does not answer in time ---------------------------------

# One drained batch: big enough to keep Kafka busy, small enough that a crash between
# publish and commit re-sends little.
DRAIN_MAX_RECORDS = 500
DRAIN_MAX_BYTES = 4 * 1024 * 1024
# Longer than the producer's request timeout, so a batch is given up on only after the
# producer itself did.
DRAIN_TIMEOUT_SECONDS = 20.0
# Short: a retry costs one batch handed to a producer that may already be delivering it, and
# each second of back-off is a second after Kafka's return before the spool moves again.
DRAIN_BACKOFF_MAX_SECONDS = 1.0
# Shutdown lets the drainer finish its batch for this long before cancelling it.
DRAIN_STOP_GRACE_SECONDS = 5.0
SPOOL_FULL_RETRY_AFTER = 30


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    durable: Durable | None
    spool_records: int
    spool_bytes: int
    spool_oldest_age_seconds: float
    spool_writable: bool


OrderKey = tuple[str, bytes]


def order_key(record: OutgoingRecord) -> OrderKey | None:
    """What a record must keep its order within: its topic and key (a call id). A record
    without a key has no order to keep (Kafka spreads such records over partitions anyway),
    so it never queues behind spooled records."""
    return None if record.key is None else (record.topic, record.key)


def _spooled_order_key(payload: bytes) -> OrderKey | None:
    try:
        return order_key(decode_record(payload))
    except ValueError:
        return None  # the drainer logs and skips it; it holds nothing back


class DurablePublisher:
    """Kafka when it acknowledges within the deadline; otherwise the spool, drained to Kafka
    in arrival order once it is back.

    Order is kept per call, not globally: a record whose key has records in the spool is
    spooled behind them; any other goes to Kafka. When a report waits out the deadline while
    Kafka acknowledges nothing at all, every record goes straight to the spool (nobody waits
    out the deadline again) until the drainer sees Kafka acknowledge a whole batch; a report
    late while Kafka acknowledges others is spooled on its own. A spool that cannot be
    written (a full or read-only disk) leaves Kafka as the only way to keep a report, whatever
    the order."""

    def __init__(
        self,
        kafka: KafkaPublisher,
        spool: Spool,
        *,
        ack_deadline_seconds: float,
        publish_timeout_seconds: float,
        crash_at: CrashPoint | None = None,
        metrics: SpoolMetrics | None = None,
    ) -> None:
        self.kafka = kafka
        self.spool = spool
        self._metrics = metrics
        self._ack_deadline = ack_deadline_seconds
        self._publish_timeout = publish_timeout_seconds
        self._crash_at = crash_at
        self._drainer: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._not_acknowledged = Throttled(log)
        self._late = Throttled(log)
        self._drain_failed = Throttled(log)
        # Records per order key that are spooled or on their way into the spool: counted
        # before the append is queued, so a later record of the same call cannot slip past.
        self._spooled: Counter[OrderKey] = Counter()
        # Kafka missed an acknowledgement and has not acknowledged a drained batch since.
        self._kafka_missed = False

    @classmethod
    def from_settings(
        cls, settings: IngressSettings, metrics: SpoolMetrics | None = None
    ) -> DurablePublisher:
        spool = Spool(
            settings.spool_dir,
            max_bytes=settings.spool_max_bytes,
            max_age_seconds=settings.spool_max_age_seconds,
            segment_bytes=settings.spool_segment_bytes,
            metrics=metrics,
            crash_at=settings.test_crash_at,
        )
        return cls(
            KafkaPublisher(settings.kafka, compression=settings.kafka_compression),
            spool,
            ack_deadline_seconds=settings.kafka_ack_deadline_seconds,
            publish_timeout_seconds=settings.publish_timeout_seconds,
            crash_at=settings.test_crash_at,
            metrics=metrics,
        )

    async def start(self) -> None:
        """Open the spool (recovering a previous run's records) and start draining it."""
        await self.spool.open()
        try:
            keys = await self.spool.scan_pending(_spooled_order_key)
            self._spooled = Counter(key for key in keys if key is not None)
            self._kafka_missed = False
            await self.kafka.start()
        except BaseException:
            await self.spool.close()
            raise
        self._stopping.clear()
        self._drainer = asyncio.create_task(self._drain_forever(), name="spool-drainer")

    async def stop(self) -> None:
        if self._drainer is not None:
            self._stopping.set()
            # Without a connection there is no batch worth waiting for.
            grace = DRAIN_STOP_GRACE_SECONDS if self.kafka.connected() else 0.0
            try:
                async with asyncio.timeout(grace):
                    await asyncio.shield(self._drainer)
            except TimeoutError:
                # Cancelled mid-batch: what was published but not committed is sent again on
                # the next start (a duplicate, never a loss).
                self._drainer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._drainer
            self._drainer = None
        try:
            await self.kafka.stop()
        finally:
            await self.spool.close()

    async def publish(self, record: OutgoingRecord) -> Durable:
        """Returns where the record is durable; raises PublishUnavailable when it is not."""
        self.kafka.check_fits(record)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._publish_timeout
        key = order_key(record)
        if self._kafka_first(key):
            started = time.monotonic()
            try:
                await self.kafka.publish(record, min(self._ack_deadline, self._publish_timeout))
                self._observe_ack(time.monotonic() - started)
                return "kafka"
            except KafkaNotAcknowledged as exc:
                self._observe_ack(time.monotonic() - started)
                if self._metrics is not None:
                    self._metrics.kafka_ack_missed.inc()
                self._missed(exc, started)
        if key is not None:
            self._spooled[key] += 1
        try:
            await self._append(record, deadline)
        except BaseException:
            self._forget(key)
            raise
        return "spool"

    def _missed(self, exc: KafkaNotAcknowledged, since: float) -> None:
        if self.kafka.acknowledged_since(since):
            # Kafka took other reports while this one waited, so it is there: this report is
            # late on its own (an event loop busy with long calls, a partition electing a
            # leader). Sending every report to the spool now would only add the spool's
            # write and the drainer's second publish to an ingress that is already behind.
            self._late.warning(
                "a report waited out the acknowledgement deadline (%s) while Kafka"
                " acknowledged others; spooling that report only",
                exc,
            )
            return
        self._kafka_missed = True
        self._not_acknowledged.warning(
            "kafka did not acknowledge (%s); spooling reports until it does", exc
        )

    def _observe_ack(self, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.kafka_ack_duration.observe(seconds)

    async def _append(self, record: OutgoingRecord, deadline: float) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                await self.spool.append(encode_record(record))
        except SpoolFull as exc:
            raise PublishUnavailable(
                f"Kafka is unavailable and the local spool is full ({exc})",
                retry_after=SPOOL_FULL_RETRY_AFTER,
            ) from exc
        except SpoolError as exc:
            raise PublishUnavailable(f"Kafka is unavailable and {exc}") from exc
        except TimeoutError as exc:
            raise PublishUnavailable(
                f"neither Kafka nor the local spool made the report durable within "
                f"{self._publish_timeout:g} s"
            ) from exc

    def _forget(self, key: OrderKey | None) -> None:
        if key is None:
            return
        left = self._spooled[key] - 1
        if left > 0:
            self._spooled[key] = left
        else:
            self._spooled.pop(key, None)

    def _kafka_first(self, key: OrderKey | None) -> bool:
        if self.spool.failing():
            return True  # the spool cannot keep it: Kafka is the only way left
        return not self._kafka_missed and key not in self._spooled

    def readiness(self) -> Readiness:
        spool = self.spool
        spool_usable = spool.has_room() and spool.writable()
        durable: Durable | None
        if self.kafka.ready() and (not self._kafka_missed or spool.failing()):
            durable = "kafka"
        elif spool_usable:
            durable = "spool"
        else:
            durable = None
        return Readiness(
            ready=durable is not None,
            durable=durable,
            spool_records=spool.depth(),
            spool_bytes=spool.pending_bytes(),
            spool_oldest_age_seconds=round(spool.oldest_age_seconds(), 3),
            spool_writable=not spool.failing(),
        )

    async def _drain_forever(self) -> None:
        delay = 0.2
        while not self._stopping.is_set():
            if not await self._wait_for_work():
                return
            try:
                batch = await self.spool.read(DRAIN_MAX_RECORDS, DRAIN_MAX_BYTES)
                acked, delivered, error = await self._publish_batch(batch)
                if acked:
                    if self._crash_at == "drain-after-publish-before-delete":
                        crash("drain-after-publish-before-delete")
                    await self.spool.commit(batch[acked - 1])
                    self._delivered(delivered)
            except Exception as exc:
                # The drainer must outlive any one failure (a read error, a bug): a dead
                # drainer would leave acknowledged reports on disk while /readyz said ready.
                log.error("spool drain failed; retrying in %.1f s", delay, exc_info=exc)
                acked, batch = 0, []
            else:
                if acked == len(batch):
                    # A whole batch acknowledged: Kafka takes records again.
                    self._kafka_missed = False
                    delay = 0.2
                    continue
                self._drain_failed.warning(
                    "spool drain: Kafka acknowledged %d of %d record(s) (%s); %d still spooled,"
                    " retrying in %.1f s",
                    acked,
                    len(batch),
                    _describe(error),
                    self.spool.depth(),
                    delay,
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
            delay = min(delay * 2, DRAIN_BACKOFF_MAX_SECONDS)

    def _delivered(self, records: list[OutgoingRecord]) -> None:
        """Release the order keys of records Kafka now has: later records of those calls
        may go to Kafka directly without overtaking them."""
        if self.spool.empty():
            # Nothing spooled, queued or being written: no key can be holding anything back
            # (this also heals a count that lost its record, e.g. to a CRC failure).
            self._spooled.clear()
            return
        for record in records:
            self._forget(order_key(record))

    async def _wait_for_work(self) -> bool:
        """False once stopping; True when something is spooled."""
        pending = asyncio.ensure_future(self.spool.wait_pending())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({pending, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pending.cancel()
            stopping.cancel()
        return not self._stopping.is_set()

    async def _publish_batch(
        self, batch: list[Spooled]
    ) -> tuple[int, list[OutgoingRecord], BaseException | None]:
        """How many leading entries of `batch` are delivered (unreadable ones count as done:
        their bytes were set aside and there is nothing left to send), the records among
        them, and why not more."""
        records: list[OutgoingRecord] = []
        index: list[int] = []  # batch position of each record
        for i, spooled in enumerate(batch):
            if spooled.payload is None:
                continue
            try:
                records.append(decode_record(spooled.payload))
                index.append(i)
            except ValueError as exc:
                log.error("spool: undecodable record at %s skipped (%s)", spooled.position, exc)
        if not records:
            return len(batch), [], None
        delivery = await self.kafka.publish_many(records, DRAIN_TIMEOUT_SECONDS)
        if delivery.acked == len(records):
            return len(batch), records, None
        # Entries before the first unacknowledged record.
        return index[delivery.acked], records[: delivery.acked], delivery.error


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "no error"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
