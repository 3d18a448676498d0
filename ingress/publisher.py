"""The one component that makes a report durable before the ingress answers.

"Durable" means acknowledged by every in-sync replica (acks=all, idempotent producer) or,
when Kafka does not acknowledge within a short deadline, fsync'd in the local spool, from
which a drainer publishes it once Kafka is back (see docs/durability.md). The Kafka side is
ingress/kafkapublisher.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core.logs import Throttled
from ingress.kafkapublisher import KafkaNotAcknowledged, KafkaPublisher, PublishUnavailable

# Re-exported: the app, the tests and the spool's users know a record by this module.
from ingress.outgoing import OutgoingRecord as OutgoingRecord
from ingress.outgoing import decode_record as decode_record
from ingress.outgoing import encode_record as encode_record
from ingress.settings import IngressSettings
from ingress.spool import CrashPoint, Spool, Spooled, SpoolError, SpoolFull, crash, finish_or_cancel
from ingress.telemetry import SpoolMetrics

log = logging.getLogger(__name__)

Durable = Literal["kafka", "spool"]

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
# A sibling draining this process's spool (ingress/takeover.py) lets go within its hold
# (10 s) plus the batch under way.
OWN_SPOOL_LOCK_WAIT_SECONDS = DRAIN_TIMEOUT_SECONDS + 20.0


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    durable: Durable | None
    spool_records: int
    spool_bytes: int
    spool_oldest_age_seconds: float
    spool_writable: bool


OrderKey = tuple[str, bytes]


def spool_at(
    settings: IngressSettings,
    directory: Path | None,
    metrics: SpoolMetrics | None = None,
    lock_wait_seconds: float = 0.0,
) -> Spool:
    """A spool in `directory` with the settings' bounds (None: a private temporary one)."""
    return Spool(
        directory,
        max_bytes=settings.spool_max_bytes,
        max_age_seconds=settings.spool_max_age_seconds,
        segment_bytes=settings.spool_segment_bytes,
        metrics=metrics,
        crash_at=settings.test_crash_at,
        lock_wait_seconds=lock_wait_seconds,
    )


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
        return cls(
            KafkaPublisher(settings.kafka, compression=settings.kafka_compression),
            spool_at(settings, settings.spool_dir, metrics, OWN_SPOOL_LOCK_WAIT_SECONDS),
            ack_deadline_seconds=settings.kafka_ack_deadline_seconds,
            publish_timeout_seconds=settings.publish_timeout_seconds,
            crash_at=settings.test_crash_at,
            metrics=metrics,
        )

    async def start(self) -> None:
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
            # Cancelled mid-batch: what was published but not committed is sent again on the
            # next start (a duplicate, never a loss).
            await finish_or_cancel(self._drainer, grace)
            self._drainer = None
        try:
            await self.kafka.stop()
        finally:
            await self.spool.close()

    async def publish(self, record: OutgoingRecord) -> Durable:
        """Returns where the record is durable; raises PublishUnavailable when it is not."""
        self.kafka.check_fits(record)
        deadline = asyncio.get_running_loop().time() + self._publish_timeout
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
            async with asyncio.timeout_at(deadline):
                await self.spool.append(encode_record(record))
        except SpoolFull as exc:
            self._forget(key)  # refused before it was queued: nothing of it is spooled
            raise PublishUnavailable(
                f"Kafka is unavailable and the local spool is full ({exc})",
                retry_after=SPOOL_FULL_RETRY_AFTER,
            ) from exc
        except SpoolError as exc:
            self._forget(key)  # refused, or its write failed and was taken back out
            raise PublishUnavailable(f"Kafka is unavailable and {exc}") from exc
        except TimeoutError as exc:
            raise PublishUnavailable(
                f"neither Kafka nor the local spool made the report durable within "
                f"{self._publish_timeout:g} s"
            ) from exc
        # A timeout or a cancel comes after the append was queued, and the spool's writer
        # still writes it (its wait is shielded): the call stays counted until the drainer
        # delivers it. Should that write fail after all, the count is one too many, which
        # only spools the call's next report, and is cleared once the spool is empty.
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

    def _forget(self, key: OrderKey | None) -> None:
        if key is not None:
            self._spooled[key] -= 1
            if self._spooled[key] <= 0:
                del self._spooled[key]

    def _kafka_first(self, key: OrderKey | None) -> bool:
        if self.spool.failing():
            return True  # the spool cannot keep it: Kafka is the only way left
        return not self._kafka_missed and key not in self._spooled

    def readiness(self) -> Readiness:
        spool = self.spool
        durable: Durable | None = None
        if self.kafka.ready() and (not self._kafka_missed or spool.failing()):
            durable = "kafka"
        elif spool.has_room() and spool.writable():
            durable = "spool"
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
                acked, delivered, error = await deliver(self.kafka, batch)
                if acked:
                    crash("drain-after-publish-before-delete", self._crash_at)
                    await self.spool.commit(batch[acked - 1])
                    self._delivered(delivered)
            except Exception as exc:
                # The drainer must outlive any one failure (a read error, a bug): a dead
                # drainer would leave acknowledged reports on disk while /readyz said ready.
                log.error("spool drain failed; retrying in %.1f s", delay, exc_info=exc)
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
                    failure_text(error),
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


async def deliver(
    kafka: KafkaPublisher, batch: list[Spooled]
) -> tuple[int, list[OutgoingRecord], BaseException | None]:
    """How many leading entries of a spooled `batch` Kafka now has (unreadable ones count as
    done: their bytes were set aside and there is nothing left to send), the records among
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
    delivery = await kafka.publish_many(records, DRAIN_TIMEOUT_SECONDS)
    if delivery.acked == len(records):
        return len(batch), records, None
    # Entries before the first unacknowledged record.
    return index[delivery.acked], records[: delivery.acked], delivery.error


def failure_text(error: BaseException | None) -> str:
    if error is None:
        return "no error"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
