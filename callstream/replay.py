"""`callstream replay`: hand a past stretch of the topic to one consumer again, or put
reports back on the topic from the storage archive once retention has dropped them.

* ``--consumer NAME --from T``: moves the committed offsets of the consumer's group back to
  the first record at or after T (a new group: forward, instead of the log start); the next
  `callstream consumer NAME` handles everything from there. The offsets it replaced go to a
  file first, which ``--restore FILE`` puts back.
* ``--consumer NAME --from T --to U``: handles exactly the records in [T, U) here and now,
  through the same Runner and the same consumer code, then puts the group's committed
  offsets back where they were.
* ``--from-storage --from T [--to U]``: re-publishes the stored records whose event time is
  in [T, U), byte for byte, onto the topic; every consumer sees them again.

Consumers are idempotent (see consumers.contract), which is what makes any of this safe:
storage keeps one row per call, alerting does not notify twice, metrics count a call once.
docs/replay.md says precisely what happens to the group's offsets in each mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from aiokafka.errors import CommitFailedError, KafkaError
from prometheus_client import CollectorRegistry

from callstream import progress as display
from callstream.consumerstatus import KafkaInspector, TopicMissingError
from callstream.replayoffsets import SavedOffsets, default_path, save
from callstream.replayplan import ReplayPlan, parse_time, plan_replay, render_plan, time_range
from consumers.catalog import registered
from consumers.contract import Consumer, Delivery
from consumers.runner import Runner, RunnerSettings
from consumers.storage import StorageBackend, StorageSettings, open_backend
from consumers.telemetry import RunnerMetrics
from core.kafkasettings import KafkaSettings
from core.offsets import commit_group_offsets
from core.producer import durable_producer
from core.topicadmin import ensure_topics
from schemas.codec import CONFLUENT_MAGIC, SINGLE_OBJECT_MAGIC, Decoder
from schemas.errors import DecodeError, SchemaError
from schemas.headers import RecordHeaders
from schemas.registry import registry_client
from schemas.report import CallReport
from schemas.store import default_store

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REFUSED = 2  # like argparse: the command was not run as asked, nothing changed

# A restore right after the Runner left can meet the group between "last member gone" and
# "Empty"; the broker refuses outside commits until then.
_RESTORE_ATTEMPTS = 30
PUBLISH_WINDOW = 1000  # records in flight before waiting for their acks


# -- replaying through a consumer's group ----------------------------------------------------


class _Window(Consumer):
    """The consumer, handed only the records inside the replay range.

    The Runner reads on past --to (it polls whole batches); those records are not the
    replay's to handle, and the group's offsets are put back afterwards anyway.
    """

    def __init__(self, inner: Consumer, topic: str, bounds: Mapping[int, tuple[int, int]]) -> None:
        self.name = inner.name
        self._inner = inner
        self._topic = topic
        self._bounds = bounds
        self.handled = 0

    async def start(self) -> None:
        await self._inner.start()

    async def stop(self) -> None:
        await self._inner.stop()

    async def handle(self, batch: Sequence[Delivery]) -> None:
        inside = [d for d in batch if self._inside(d)]
        if not inside:
            return
        await self._inner.handle(inside)
        self.handled += len(inside)

    def _inside(self, delivery: Delivery) -> bool:
        start, stop = self._bounds.get(delivery.partition, (0, 0))
        return delivery.topic == self._topic and start <= delivery.offset < stop


async def replay_consumer(
    kafka: KafkaSettings,
    consumer: str,
    since: datetime,
    until: datetime | None,
    *,
    env: Mapping[str, str],
    settings: RunnerSettings,
    out: TextIO,
    err: TextIO,
    dry_run: bool = False,
    stop: asyncio.Event | None = None,
    registry: CollectorRegistry | None = None,
    progress_interval: float = 1.0,
    offsets_file: Path | None = None,
) -> int:
    """Replay [since, until) of `settings.topic` through `consumer` in `settings.group_id`.

    Without `until` only the group's offsets move (the ones replaced are saved in
    `offsets_file`, by default a new file in the working directory); with it the range is
    handled here.
    Returns an exit code; refuses (EXIT_REFUSED, nothing changed) while the group has members.
    """
    known = registered()
    found = known.get(consumer)
    if found is None:
        err.write(f"no consumer named {consumer!r}; registered: {', '.join(sorted(known))}\n")
        return EXIT_REFUSED
    if until is not None and until <= since:
        err.write("--to must be later than --from\n")
        return EXIT_REFUSED
    group_id, topic = settings.group_id, settings.topic
    async with KafkaInspector(kafka) as inspector:
        group = await inspector.group(group_id)
        if group.active and not dry_run:
            err.write(
                f"refusing to replay: group {group_id} is active ({group.state},"
                f" {group.members} member(s)).\nStop every `callstream consumer {consumer}` first;"
                " moving the offsets of a running group would be overwritten by its next commit.\n"
            )
            return EXIT_REFUSED
        try:
            plan = await plan_replay(inspector, consumer, group_id, topic, since, until)
        except TopicMissingError as exc:
            err.write(f"{exc}: nothing to replay\n")
            return EXIT_FAILED
        out.write(render_plan(plan, bounded=until is not None))
        if dry_run:
            if group.active:
                out.write(
                    f"note: group {group_id} is {group.state} with {group.members} member(s);"
                    " a real replay would be refused until it is stopped\n"
                )
            out.write("dry run: nothing changed\n")
            return EXIT_OK
        if until is None:
            path = offsets_file or default_path(group_id)
            return await _rewind(kafka, plan, consumer, path, out, err)
        if plan.total == 0:
            out.write("nothing to replay: the group's offsets were not touched\n")
            return EXIT_OK
        registry = registry or CollectorRegistry()
        return await _replay_window(
            kafka,
            inspector,
            plan,
            found.spec.build(env, registry),
            settings,
            registry,
            out=out,
            err=err,
            stop=stop or asyncio.Event(),
            interval=progress_interval,
        )


async def _rewind(
    kafka: KafkaSettings,
    plan: ReplayPlan,
    consumer: str,
    offsets_file: Path,
    out: TextIO,
    err: TextIO,
) -> int:
    moves = {p.partition: r for p in plan.partitions if (r := p.rewind_to) is not None}
    if not moves:
        out.write("nothing to move: the group's offsets were not touched\n")
        return EXIT_OK
    replaced = {p.partition: p.committed for p in plan.partitions if p.partition in moves}
    saved = SavedOffsets(plan.group_id, plan.topic, replaced, datetime.now(UTC))
    await asyncio.to_thread(save, offsets_file, saved)
    try:
        await commit_group_offsets(kafka, plan.group_id, plan.topic, moves)
    except CommitFailedError:
        await asyncio.to_thread(offsets_file.unlink, missing_ok=True)
        err.write(f"refusing to replay: group {plan.group_id} became active; nothing was changed\n")
        return EXIT_REFUSED
    ahead = sum(p.end - p.start for p in plan.partitions if p.partition in moves)
    out.write(
        f"moved group {plan.group_id} on {len(moves)} partition(s): the next"
        f" `callstream consumer {consumer}` handles {ahead} record(s) from --from on,"
        " then carries on with new ones\n"
        f"the offsets it replaced are in {offsets_file}; to undo, stop the consumer and run"
        f" `callstream replay --restore {offsets_file}`\n"
    )
    return EXIT_OK


async def _replay_window(
    kafka: KafkaSettings,
    inspector: KafkaInspector,
    plan: ReplayPlan,
    consumer: Consumer,
    settings: RunnerSettings,
    registry: CollectorRegistry,
    *,
    out: TextIO,
    err: TextIO,
    stop: asyncio.Event,
    interval: float,
) -> int:
    try:
        await commit_group_offsets(
            kafka, plan.group_id, plan.topic, {p.partition: p.start for p in plan.partitions}
        )
    except CommitFailedError:
        err.write(f"refusing to replay: group {plan.group_id} became active; nothing was changed\n")
        return EXIT_REFUSED
    window = _Window(
        consumer, plan.topic, {p.partition: (p.start, p.stop) for p in plan.partitions}
    )
    async with aiohttp.ClientSession() as session:
        runner = Runner(
            window,
            kafka,
            settings,
            RunnerMetrics(registry, consumer.name),
            Decoder(default_store(), registry_client(kafka, session)),
        )
        runner_stop = asyncio.Event()
        task = asyncio.create_task(runner.run(runner_stop), name=f"replay-{consumer.name}")
        label = f"replay {consumer.name}"
        progress = display.track(label, plan.total, stream=err, interval=interval)
        try:
            outcome = await _watch(inspector, plan, task, stop, progress, interval)
        finally:
            runner_stop.set()
            runner_error = await _finish(task)
            # The Runner commits the batch in hand as it stops: count that one too.
            committed = await inspector.committed(plan.group_id, plan.topic, plan.numbers)
            progress.finish(plan.done(committed))
            restored = await _restore(kafka, inspector, plan, err)
    if outcome == "stopped" and plan.finished(committed):
        outcome = "finished"
    if runner_error is not None:
        err.write(f"replay failed: {runner_error}\n")
    summary = {
        "finished": "replayed",
        "stopped": "stopped early after",
        "intruder": "stopped early (another member joined the group) after",
    }[outcome]
    out.write(
        f"{summary} {progress.done} of {plan.total} record(s) through {consumer.name}"
        f" ({window.handled} handed to the consumer)\n"
    )
    if restored:
        out.write(f"group {plan.group_id}: committed offsets restored to where they were\n")
    if runner_error is not None or not restored:
        return EXIT_FAILED
    return EXIT_OK if outcome == "finished" else EXIT_FAILED


async def _watch(
    inspector: KafkaInspector,
    plan: ReplayPlan,
    task: asyncio.Task[None],
    stop: asyncio.Event,
    progress: display.Progress,
    interval: float,
) -> str:
    """Until every partition's commits reached --to ("finished"), the caller asks to stop
    ("stopped"), or someone else joins the group ("intruder")."""
    while not task.done() and not stop.is_set():
        committed = await inspector.committed(plan.group_id, plan.topic, plan.numbers)
        progress.update(plan.done(committed))
        if plan.finished(committed):
            return "finished"
        group = await inspector.group(plan.group_id)
        if group.members > 1:
            # A `callstream consumer` started meanwhile now shares the partitions, so this
            # replay no longer sees the whole range, and its offsets cannot be put back
            # while that member holds the group.
            return "intruder"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
    return "stopped"


async def _finish(task: asyncio.Task[None]) -> BaseException | None:
    try:
        await task
    except Exception as exc:
        log.exception("replay runner failed")
        return exc
    return None


async def _restore(
    kafka: KafkaSettings, inspector: KafkaInspector, plan: ReplayPlan, err: TextIO
) -> bool:
    beginning, _ = await inspector.log_offsets(plan.topic, plan.numbers)
    # A partition the group had never committed goes to the log start: where
    # auto_offset_reset=earliest would have started it.
    offsets = {
        p.partition: p.committed if p.committed is not None else beginning[p.partition]
        for p in plan.partitions
    }
    for attempt in range(_RESTORE_ATTEMPTS):
        group = await inspector.group(plan.group_id)
        if not group.active:
            with contextlib.suppress(CommitFailedError):
                await commit_group_offsets(kafka, plan.group_id, plan.topic, offsets)
                return True
        if attempt + 1 < _RESTORE_ATTEMPTS:
            await asyncio.sleep(0.5)
    listing = ", ".join(f"{p}:{o}" for p, o in sorted(offsets.items()))
    err.write(
        f"could not restore the offsets of group {plan.group_id}: it has members again.\n"
        f"Put them back by hand once it is stopped (partition:offset on {plan.topic}): "
        f"{listing}\n"
    )
    return False


async def restore_command(kafka: KafkaSettings, path: Path, out: TextIO, err: TextIO) -> int:
    """Commit the saved offsets back; refuses while the group has members."""
    saved = SavedOffsets.load(path)
    async with KafkaInspector(kafka) as inspector:
        group = await inspector.group(saved.group_id)
        if group.active:
            err.write(
                f"refusing to restore: group {saved.group_id} is active ({group.state},"
                f" {group.members} member(s)); stop its consumers first\n"
            )
            return EXIT_REFUSED
        beginning, _ = await inspector.log_offsets(saved.topic, sorted(saved.offsets))
    offsets = {p: beginning[p] if o is None else o for p, o in saved.offsets.items()}
    try:
        await commit_group_offsets(kafka, saved.group_id, saved.topic, offsets)
    except CommitFailedError:
        err.write(f"refusing to restore: group {saved.group_id} became active; nothing changed\n")
        return EXIT_REFUSED
    listing = ", ".join(f"{p}:{o}" for p, o in sorted(offsets.items()))
    out.write(
        f"restored group {saved.group_id} on {saved.topic} to the offsets saved at"
        f" {saved.saved_at.isoformat()} (partition:offset {listing})\n"
    )
    return EXIT_OK


# -- re-publishing from the storage archive ------------------------------------------------


def record_headers(record: bytes, decoded: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The headers the ingress gives a record, from the record itself (`decoded` is its
    Avro record), plus where it came from this time."""
    if record[:2] == SINGLE_OBJECT_MAGIC:
        schema_id, wire_format = record[2:10].hex(), "avro-single-object"
    elif record[:1] == CONFLUENT_MAGIC:
        schema_id, wire_format = str(int.from_bytes(record[1:5], "big")), "confluent"
    else:
        raise SchemaError(f"stored record has unknown framing {record[:2].hex()}")
    source = decoded["source"]
    headers = RecordHeaders(
        decoded["event_type"], schema_id, wire_format, source["format"], source["request_id"]
    )
    return [*headers.encode(), ("replayed-from", b"storage")]


async def republish_from_storage(
    kafka: KafkaSettings,
    records: StorageBackend,
    since: datetime,
    until: datetime | None,
    *,
    out: TextIO,
    err: TextIO,
    dry_run: bool = False,
    topic: str | None = None,
    stop: asyncio.Event | None = None,
    progress_interval: float = 1.0,
    decoder: Decoder | None = None,
) -> int:
    """Publish the stored reports with event times in [since, until) onto `topic` (default:
    the reports topic), keyed by call id, acks=all."""
    if until is not None and until <= since:
        err.write("--to must be later than --from\n")
        return EXIT_REFUSED
    topic = topic or kafka.topic
    # Counting first costs one more read of the range, and buys a real total and ETA.
    total = 0
    async for _ in records.iter_records(since, until):
        total += 1
    out.write(f"{total} stored report(s) with event times {time_range(since, until)}\n")
    if dry_run:
        out.write(f"dry run: nothing published to {topic}\n")
        return EXIT_OK
    if total == 0:
        return EXIT_OK
    decoder = decoder or Decoder(default_store())
    stop = stop or asyncio.Event()
    await ensure_topics(kafka, [topic])
    producer = durable_producer(
        kafka,
        "callstream-replay",
        linger_ms=5,
        compression_type="lz4",
        request_timeout_ms=30_000,
    )
    progress = display.track("re-publish", total, stream=err, interval=progress_interval)
    published = 0
    rows = records.iter_records(since, until)
    try:
        await producer.start()
        pending: list[asyncio.Future[Any]] = []
        async for call_id, record in rows:
            if stop.is_set():
                break
            try:
                decoded = (await decoder.decode(record)).record
                # Checked as the runner checks it; the report itself is not needed here.
                CallReport.check_record(decoded)
            except (DecodeError, SchemaError) as exc:
                err.write(f"cannot read the stored record of call {call_id}: {exc}\n")
                break
            # The key comes from the record, not from the row: the archive's column copy of
            # the id may have been sanitised, the record never is.
            pending.append(
                await producer.send(
                    topic,
                    record,
                    key=decoded["call_id"].encode(),
                    headers=record_headers(record, decoded),
                )
            )
            if len(pending) >= PUBLISH_WINDOW:
                published += await all_acked(pending)
                progress.update(published)
        published += await all_acked(pending)
    except KafkaError as exc:
        err.write(f"publishing to {topic} failed after {published} record(s): {exc}\n")
        return EXIT_FAILED
    finally:
        progress.finish(published)
        # A generator left mid-way is otherwise only finalised by the garbage collector.
        close = getattr(rows, "aclose", None)
        if close is not None:
            await close()
        await producer.stop()
    out.write(f"re-published {published} of {total} report(s) onto {topic}\n")
    return EXIT_OK if published == total else EXIT_FAILED


async def all_acked(pending: list[asyncio.Future[Any]]) -> int:
    """Wait for every send in flight; raises the first failure."""
    count = len(pending)
    await asyncio.gather(*pending)
    pending.clear()
    return count


# -- the command ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    consumer: str | None
    since: str | None  # None only with `restore`
    until: str | None
    dry_run: bool
    from_storage: bool
    restore: Path | None = None
    offsets_file: Path | None = None


async def replay_command(
    request: ReplayRequest,
    env: Mapping[str, str],
    kafka: KafkaSettings,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    if request.restore is not None:
        try:
            return await restore_command(kafka, request.restore, out, err)
        except (OSError, ValueError) as exc:
            err.write(f"callstream replay --restore: {exc}\n")
            return EXIT_REFUSED
        except KafkaError as exc:
            err.write(f"callstream replay --restore: Kafka at {kafka.bootstrap_servers}: {exc}\n")
            return EXIT_FAILED
    assert request.since is not None  # the command line asks for --from without --restore
    try:
        since = parse_time(request.since)
        until = parse_time(request.until) if request.until is not None else None
    except ValueError as exc:
        err.write(f"callstream replay: {exc}\n")
        return EXIT_REFUSED
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Ctrl-C and SIGTERM stop the replay between batches, and the offsets still go back.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if request.from_storage:
            async with (
                open_backend(StorageSettings.from_env(env)) as backend,
                aiohttp.ClientSession() as session,
            ):
                return await republish_from_storage(
                    kafka,
                    backend,
                    since,
                    until,
                    out=out,
                    err=err,
                    dry_run=request.dry_run,
                    stop=stop,
                    decoder=Decoder(default_store(), registry_client(kafka, session)),
                )
        assert request.consumer is not None
        return await replay_consumer(
            kafka,
            request.consumer,
            since,
            until,
            env=env,
            settings=RunnerSettings.for_consumer(env, request.consumer, kafka),
            out=out,
            err=err,
            dry_run=request.dry_run,
            stop=stop,
            offsets_file=request.offsets_file,
        )
    except KafkaError as exc:
        err.write(f"callstream replay: Kafka at {kafka.bootstrap_servers}: {exc}\n")
        return EXIT_FAILED
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
