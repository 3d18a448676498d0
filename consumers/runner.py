"""The one place consumers meet Kafka.

Poll a batch, decode it, hand the reports to the consumer, commit only after it returned.

* Retryable errors pause every assigned partition and back off (polling on, so the group
  keeps us), then retry the same batch; nothing is committed meanwhile.
* Records that cannot be decoded, and records the handler fails on permanently, go to
  ``<topic>.dlq`` with the reason and their origin in headers; the rest of the batch goes on.
  A failing batch is split record by record to find the ones to dead-letter.
* The next batch is fetched and decoded while the consumer handles the current one, so the
  handler (a database write, mostly) is what bounds catch-up, not the round trips and the
  decoding in between; it gathers everything that arrives meanwhile, so at a steady rate a
  record waits for one batch in hand, not two. A batch's commit travels while the next one
  is handled; the commit after it, a rebalance and a stop each wait for it first.
* A rebalance waits for the batch in hand (committing it if it finished); a batch still
  retrying is dropped uncommitted, and the partition's new owner gets it again. So is a
  batch fetched ahead before the rebalance: it is never handled nor committed, and whoever
  owns its partitions next reads them again from the last commit.
* Stopping (SIGTERM) finishes the batch, commits, and leaves the group.
* A record re-driven from the dead-letter topic for another consumer (``redrive-for``
  header) is passed over and committed with the rest.
* A consumer that `reads_events` gets the events topic too, in the same group and on the
  same terms: one subscription, each batch split by topic, the reports handed to `handle`
  and then the events to `handle_events`, one commit for both once both returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from consumers.contract import REDRIVE_HEADER, Consumer, DecodedDelivery, Delivery, EventDelivery
from consumers.errors import RetryableError
from consumers.telemetry import RunnerMetrics
from core.kafkasettings import KafkaSettings
from core.producer import durable_producer
from core.settings import EnvSettings, setting, settings_class
from core.topicadmin import ensure_topics
from core.topicreader import RawRecord
from schemas.codec import Decoded, Decoder
from schemas.errors import DecodeError, SchemaError, UnknownSchemaError
from schemas.events import FlireoEvent
from schemas.report import CallReport, record_time
from schemas.store import END_OF_CALL_REPORT, FLIREO_EVENT

log = logging.getLogger(__name__)

MAX_POLL_INTERVAL_MS = 15 * 60 * 1000
STOP_COMMIT_GRACE_SECONDS = 10.0
# While a batch is in hand, the next one is gathered in steps this long: each step takes what
# has arrived, so that aiokafka goes on fetching.
GATHER_STEP_SECONDS = 0.005
_D = TypeVar("_D", Delivery, EventDelivery)


@settings_class
class RunnerSettings(EnvSettings):
    group_id: str = setting(
        "CALLSTREAM_GROUP_ID",
        doc="Consumer group. Empty: callstream-<consumer name> (keep it empty unless you know "
        "why).",
    )
    topic: str  # the Kafka settings' topic
    batch_size: int = setting(
        "CALLSTREAM_BATCH_SIZE",
        default=500,
        minimum=1,
        doc="Most records handed to a consumer in one batch.",
    )
    poll_timeout_seconds: float = 0.5
    retry_initial_seconds: float = setting(
        "CALLSTREAM_RETRY_INITIAL_SECONDS",
        default=0.5,
        minimum=0.01,
        doc="First back-off (seconds) after a retryable handler error; doubles per attempt.",
    )
    retry_max_seconds: float = setting(
        "CALLSTREAM_RETRY_MAX_SECONDS",
        default=30.0,
        minimum=0.01,
        doc="Longest back-off (seconds) between retries.",
    )
    auto_offset_reset: str = "earliest"

    @classmethod
    def for_consumer(
        cls, env: Mapping[str, str], consumer: str, kafka: KafkaSettings
    ) -> RunnerSettings:
        # A stable group per consumer name: restarts resume, `--scale` shares partitions.
        return cls.from_env(env, group_id=f"callstream-{consumer}", topic=kafka.topic)


@dataclass(slots=True)
class _Batch:
    """A batch as fetched, decoded as far as needs no I/O, and the rebalance it came from."""

    generation: int
    fetched: list[RawRecord]
    offsets: dict[TopicPartition, int]
    # Decoded without I/O (a report, an event, or the DecodeError that makes the record
    # poison), by position in `fetched`; records missing here need the schema registry.
    decoded: dict[int, Delivery | EventDelivery | DecodeError]


def _joined(first: _Batch | None, then: _Batch | None) -> _Batch | None:
    """`first` followed by `then`, fetched after it; a rebalance in between voids `first`."""
    if first is None or then is None:
        return then if first is None else first
    if then.generation != first.generation:
        return then
    shift = len(first.fetched)
    return _Batch(
        first.generation,
        first.fetched + then.fetched,
        first.offsets | then.offsets,
        first.decoded | {shift + i: outcome for i, outcome in then.decoded.items()},
    )


class _Abandoned(Exception):
    """The batch in hand must be dropped uncommitted (stop or rebalance while retrying)."""


class Runner:
    def __init__(
        self,
        consumer: Consumer,
        kafka: KafkaSettings,
        settings: RunnerSettings,
        metrics: RunnerMetrics,
        decoder: Decoder,
    ) -> None:
        self._consumer = consumer
        self._kafka = kafka
        self._settings = settings
        self._metrics = metrics
        self._decoder = decoder
        self._lock = asyncio.Lock()
        self._committing: asyncio.Task[None] | None = None
        self._revoked = False
        # Counts rebalances: a batch fetched before the latest one is stale (see _Batch).
        self._generation = 0
        self._stop = asyncio.Event()
        self._kc: AIOKafkaConsumer | None = None
        self._dlq: AIOKafkaProducer | None = None
        self._committed: dict[TopicPartition, int] = {}
        self._name_bytes = consumer.name.encode()
        self.running = False
        self.last_batch_at: float | None = None

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        kc = AIOKafkaConsumer(
            **self._kafka.client_kwargs() | {"client_id": f"callstream-{self._consumer.name}"},
            group_id=self._settings.group_id,
            enable_auto_commit=False,
            auto_offset_reset=self._settings.auto_offset_reset,
            max_poll_records=self._settings.batch_size,
            # Fetch big chunks: catch-up speed is bounded by round trips, not bytes.
            fetch_max_bytes=32 * 1024 * 1024,
            max_partition_fetch_bytes=8 * 1024 * 1024,
            # A batch may legitimately take minutes (alert channels backing off, a database
            # coming back); the group must not evict us for it.
            max_poll_interval_ms=MAX_POLL_INTERVAL_MS,
        )
        dlq = durable_producer(self._kafka, f"callstream-{self._consumer.name}-dlq")
        topics = [self._settings.topic]
        if self._consumer.reads_events:
            topics.append(self._kafka.events_topic)
        await self._consumer.start()
        try:
            await ensure_topics(self._kafka, [*topics, self._kafka.dlq_topic])
            await dlq.start()
            await kc.start()
            self._kc, self._dlq = kc, dlq
            kc.subscribe(topics, listener=_Listener(self))
            self.running = True
            await self._loop(kc)
        finally:
            self.running = False
            # stop() leaves the group at once, so the partitions move without a session timeout.
            await _close(kc.stop, "the Kafka consumer")
            await _close(dlq.stop, "the dead-letter producer")
            await self._consumer.stop()

    async def _loop(self, kc: AIOKafkaConsumer) -> None:
        ahead: asyncio.Task[_Batch | None] | None = None
        try:
            while not self._stop.is_set():
                batch = await (ahead if ahead is not None else self._fetch(kc))
                ahead = None
                if batch is None:
                    self._update_lag(kc)
                    continue
                handled = asyncio.Event()
                ahead = asyncio.create_task(self._gather(kc, handled))
                try:
                    async with self._lock:
                        if batch.generation != self._generation:
                            # aiokafka's rebalances revoke every partition and restart each
                            # kept one at its committed offset, so these records come again.
                            log.info(
                                "batch of %d fetched before a rebalance dropped", len(batch.fetched)
                            )
                            continue
                        self._revoked = False
                        started = time.perf_counter()
                        try:
                            await self._process(batch)
                        except _Abandoned:
                            log.info(
                                "batch of %d dropped uncommitted (stop or rebalance)",
                                len(batch.fetched),
                            )
                            continue
                        # One commit in flight at a time, so they reach the group in order.
                        await self._settled()
                        self._committing = asyncio.create_task(
                            self._commit(kc, batch.offsets, started)
                        )
                finally:
                    handled.set()
        finally:
            await self._settled()
            if ahead is not None:
                # Whatever it fetched is dropped: the next owner reads it from the commit.
                ahead.cancel()
                await asyncio.wait([ahead])
                if not ahead.cancelled() and ahead.exception() is not None:
                    log.info("fetching ahead failed on the way out: %s", ahead.exception())

    async def _gather(self, kc: AIOKafkaConsumer, handled: asyncio.Event) -> _Batch | None:
        """The next batch, gathered while the one in hand is handled: whatever arrives
        meanwhile, up to a batch. Taking only the first records to arrive would leave the
        rest buffered (aiokafka fetches no more until they are taken), so at a steady rate a
        record would wait for two batches in hand instead of one."""
        size = self._settings.batch_size
        gathered: _Batch | None = None
        while gathered is None or len(gathered.fetched) < size:
            room = size - (len(gathered.fetched) if gathered is not None else 0)
            if handled.is_set():
                # The batch in hand is done: hand over what is here, plus what is buffered.
                wait = 0.0 if gathered is not None else self._settings.poll_timeout_seconds
                return _joined(gathered, await self._fetch(kc, room, wait))
            gathered = _joined(gathered, await self._fetch(kc, room, GATHER_STEP_SECONDS))
        return gathered

    async def _fetch(
        self, kc: AIOKafkaConsumer, room: int | None = None, wait: float | None = None
    ) -> _Batch | None:
        polled = await kc.getmany(
            timeout_ms=int((self._settings.poll_timeout_seconds if wait is None else wait) * 1000),
            max_records=self._settings.batch_size if room is None else room,
        )
        # Read in the same step as getmany returned: aiokafka hands out nothing while a
        # rebalance is under way, so these records belong to this generation's assignment.
        generation = self._generation
        if not polled:
            return None
        fetched = [RawRecord.of(m) for records in polled.values() for m in records]
        offsets = {tp: records[-1].offset + 1 for tp, records in polled.items() if records}
        decoded: dict[int, Delivery | EventDelivery | DecodeError] = {}
        for i, record in enumerate(fetched):
            if not self._meant_for_us(record):
                continue
            try:
                decoded[i] = self._formed(record, self._decoder.decode_local(record.value))
            except UnknownSchemaError:
                pass  # the registry may know it: _process asks, with retries
            except DecodeError as undecodable:
                decoded[i] = undecodable
        return _Batch(generation, fetched, offsets, decoded)

    async def _process(self, batch: _Batch) -> None:
        fetched = batch.fetched
        self._metrics.consumed.inc(len(fetched))
        deliveries: list[Delivery] = []
        events: list[EventDelivery] = []
        poison: list[tuple[RawRecord, Exception]] = []
        for i, record in enumerate(fetched):
            if not self._meant_for_us(record):
                self._metrics.skipped.inc()
                continue
            try:
                outcome = batch.decoded.get(i) or await self._decode(record)
                if isinstance(outcome, DecodeError):
                    raise outcome
            except DecodeError as undecodable:
                poison.append((record, undecodable))
                continue
            if isinstance(outcome, Delivery):
                deliveries.append(outcome)
            else:
                events.append(outcome)
        by_position = {(f.topic, f.partition, f.offset): f for f in fetched}
        failed = [
            ((d.topic, d.partition, d.offset), exc)
            for d, exc in await self._handle(deliveries, self._consumer.handle)
        ]
        self._observe_delays(deliveries, {position for position, _ in failed})
        failed += [
            ((e.topic, e.partition, e.offset), exc)
            for e, exc in await self._handle(events, self._consumer.handle_events)
        ]
        poison += [(by_position[position], exc) for position, exc in failed]
        for record, exc in poison:
            await self._dead_letter(record, exc)

    def _observe_delays(
        self, deliveries: Sequence[Delivery], failed: set[tuple[str, int, int]]
    ) -> None:
        now = datetime.now(UTC)
        for delivery in deliveries:
            if (delivery.topic, delivery.partition, delivery.offset) not in failed:
                delay = (now - _event_time(delivery)).total_seconds()
                self._metrics.end_to_end_delay.observe(max(delay, 0.0))

    def _meant_for_us(self, record: RawRecord) -> bool:
        for name, value in record.headers:
            if name == REDRIVE_HEADER:
                return value == self._name_bytes
        return True

    async def _decode(self, record: RawRecord) -> Delivery | EventDelivery:
        attempt = 0
        while True:
            try:
                return self._formed(record, await self._decoder.decode(record.value))
            except SchemaError as exc:
                # The schema registry is unreachable: the record is fine, the world is not.
                attempt += 1
                await self._back_off(exc, attempt)

    def _formed(self, record: RawRecord, decoded: Decoded) -> Delivery | EventDelivery:
        """The report or event `decoded` holds, if its topic carries those; else DecodeError."""
        reports = record.topic == self._settings.topic
        expected, topic = (
            (END_OF_CALL_REPORT, "end-of-call-report") if reports else (FLIREO_EVENT, "events")
        )
        if decoded.name != expected:
            raise DecodeError(f"a {decoded.name} record on the {topic} topic")
        where = (record.topic, record.partition, record.offset, record.value)
        try:
            if reports:
                # Checked now, built when a consumer reads it (see DecodedDelivery).
                CallReport.check_record(decoded.record)
                return DecodedDelivery(None, *where, record=decoded.record)
            return EventDelivery(FlireoEvent.from_record(decoded.record), *where)
        except (KeyError, TypeError, ValueError) as exc:
            what = "a report" if reports else "an event"
            raise DecodeError(f"record does not form {what}: {exc}") from exc

    async def _handle(
        self, deliveries: Sequence[_D], handler: Callable[[Sequence[_D]], Awaitable[None]]
    ) -> list[tuple[_D, Exception]]:
        """Handle with retries; returns the records that failed permanently."""
        if not deliveries:
            return []
        attempt = 0
        while True:
            try:
                await handler(deliveries)
            except RetryableError as exc:
                attempt += 1
                self._metrics.failed.inc()
                await self._back_off(exc, attempt)
                continue
            except Exception as exc:
                self._metrics.failed.inc()
                if len(deliveries) == 1:
                    d = deliveries[0]
                    log.warning(
                        "%s failed permanently on %s[%d]@%d: %s",
                        self._consumer.name,
                        d.topic,
                        d.partition,
                        d.offset,
                        _describe(exc),
                    )
                    return [(d, exc)]
                # Find the culprits one by one; the handler is idempotent, so the records it
                # already handled in the failed attempt come to no harm.
                failures: list[tuple[_D, Exception]] = []
                for delivery in deliveries:
                    failures += await self._handle([delivery], handler)
                return failures
            self._metrics.retrying.set(0)
            self._metrics.handled.inc(len(deliveries))
            return []

    async def _back_off(self, exc: Exception, attempt: int) -> None:
        self._metrics.retrying.set(1)
        base = min(
            self._settings.retry_initial_seconds * 2 ** (attempt - 1),
            self._settings.retry_max_seconds,
        )
        delay = base * (0.5 + random.random() / 2)
        log.warning(
            "%s: retryable error (attempt %d), retrying in %.2fs: %s",
            self._consumer.name,
            attempt,
            delay,
            _describe(exc),
        )
        await self._idle(delay)

    async def _idle(self, seconds: float) -> None:
        """Wait while staying in the group: partitions paused, polling on."""
        kc = self._kc
        assert kc is not None
        assigned = kc.assignment()
        kc.pause(*assigned)
        try:
            deadline = time.monotonic() + seconds
            while (remaining := deadline - time.monotonic()) > 0:
                if self._stop.is_set() or self._revoked:
                    raise _Abandoned
                await kc.getmany(timeout_ms=max(1, int(min(remaining, 0.2) * 1000)))
        finally:
            kc.resume(*[tp for tp in assigned if tp in kc.assignment()])
        if self._stop.is_set() or self._revoked:
            raise _Abandoned

    async def _dead_letter(self, record: RawRecord, exc: Exception) -> None:
        dlq = self._dlq
        assert dlq is not None
        headers = [
            *record.headers,
            ("dlq.error", _describe(exc)[:2000].encode()),
            ("dlq.error.type", type(exc).__name__.encode()),
            ("dlq.topic", record.topic.encode()),
            ("dlq.partition", str(record.partition).encode()),
            ("dlq.offset", str(record.offset).encode()),
            ("dlq.consumer", self._consumer.name.encode()),
        ]
        attempt = 0
        while True:
            try:
                await dlq.send_and_wait(
                    self._kafka.dlq_topic, record.value, key=record.key, headers=headers
                )
                break
            except KafkaError as send_exc:
                if not send_exc.retriable:
                    # Retrying cannot help (record too large, not authorised): stop loudly
                    # rather than stall the partition behind "retryable" log lines.
                    raise
                attempt += 1
                await self._back_off(send_exc, attempt)
        self._metrics.dead_lettered.inc()
        log.warning(
            "%s dead-lettered %s[%d]@%d: %s",
            self._consumer.name,
            record.topic,
            record.partition,
            record.offset,
            _describe(exc),
        )

    async def _settled(self) -> None:
        """The last batch's commit, once it is through (it travels while the next batch is
        handled: a round trip to the group coordinator is as long as a small batch's write)."""
        committing, self._committing = self._committing, None
        if committing is not None:
            await committing

    async def _commit(
        self, kc: AIOKafkaConsumer, offsets: dict[TopicPartition, int], started: float
    ) -> None:
        # aiokafka retries a commit for as long as the group coordinator is unreachable: with
        # the broker gone, a stop would wait for it to come back. Once stopping, the commit
        # gets a grace period, then is given up (the next owner re-handles from the last one).
        commit = asyncio.ensure_future(kc.commit(offsets))
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([commit, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not commit.done():
                await asyncio.wait([commit], timeout=STOP_COMMIT_GRACE_SECONDS)
        finally:
            stopping.cancel()
            if not commit.done():
                commit.cancel()
                await asyncio.wait([commit])
        if commit.cancelled():
            log.warning("stopping: the last commit did not reach the broker; records re-handled")
            return
        try:
            commit.result()
        except CommitFailedError as exc:
            # Lost the partitions meanwhile: their new owner re-handles from the last commit,
            # which idempotent handlers absorb.
            log.warning("commit failed after a rebalance, records will be re-handled: %s", exc)
            return
        self._committed.update(offsets)
        self._update_lag(kc)
        self._metrics.last_commit.set(time.time())
        self._metrics.batch_duration.observe(time.perf_counter() - started)
        self.last_batch_at = time.time()

    def _update_lag(self, kc: AIOKafkaConsumer) -> None:
        for tp in kc.assignment():
            highwater = kc.highwater(tp)
            committed = self._committed.get(tp)
            if highwater is None or committed is None:
                continue
            self._metrics.lag.labels(self._metrics.consumer, str(tp.partition)).set(
                max(highwater - committed, 0)
            )

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        # First, before any await: a batch fetched ahead from now on is known to be stale.
        self._generation += 1
        self._revoked = True
        # Waits for the batch in hand: it either commits or is abandoned (see _idle).
        async with self._lock:
            await self._settled()
            for tp in revoked:
                self._committed.pop(tp, None)
                with contextlib.suppress(KeyError):
                    self._metrics.lag.remove(self._metrics.consumer, str(tp.partition))


async def _close(stop: Callable[[], Awaitable[None]], what: str) -> None:
    """Close a Kafka client on the way out, whatever state the broker is in: one that fails
    to close must not keep the others (and the consumer's own stop) from closing."""
    try:
        await stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # we are being cancelled ourselves
        # aiokafka 0.14's fetcher re-raises the cancellation of a fetch it was retrying
        # when the broker is away; the process is stopping anyway.
        log.warning("closing %s was cut short (is the broker away?)", what)
    except KafkaError as exc:
        log.warning("closing %s failed: %s", what, exc)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runner: Runner) -> None:
        self._runner = runner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._runner.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._runner._revoked = False


def _event_time(delivery: Delivery) -> datetime:
    """The report's event time, without building the report only for that."""
    if isinstance(delivery, DecodedDelivery) and delivery.record is not None:
        return record_time(delivery.record["event_time"])
    return delivery.report.event_time


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
