"""`callstream replay` against the real broker: plans, refusals, bounded replays through the
real consumers, and re-publishing from the storage archive.

Records are produced with explicit Kafka timestamps (hours in the past, in order), so each
test knows exactly which records a time range selects; the expected per-partition counts
are computed from what is read back off the topic, not from the code under test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from callstream.consumerstatus import KafkaInspector
from callstream.replay import EXIT_OK, EXIT_REFUSED, replay_consumer, republish_from_storage
from callstream.replayplan import parse_time
from consumers import metrics, storage
from consumers.contract import Consumer
from consumers.runner import RunnerSettings
from consumers.storage import StorageBackend, StorageSettings, open_backend
from core.kafkasettings import KafkaSettings
from core.offsets import commit_group_offsets
from core.producer import durable_producer
from core.settings import to_env
from core.signing import WEBHOOK_PATH
from core.topicadmin import ensure_topics
from core.topicreader import RawRecord, read_topic
from schemas.headers import RecordHeaders
from tests.conftest import TEST_SECRET, Client, wait_drained
from tests.signing import signed
from tests.support.cli import callstream, run_cli
from tests.support.produce import encode, sample_report
from tests.support.runner import Recorder, eventually, running

NOW = datetime.now(UTC).replace(microsecond=0)
HOUR = timedelta(hours=1)


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _in_a_scratch_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replay that moves offsets saves the ones it replaced in the working directory."""
    monkeypatch.chdir(tmp_path)


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


async def produce_at(
    kafka: KafkaSettings, items: Sequence[tuple[dict[str, Any], datetime]]
) -> list[str]:
    """Publish reports as the ingress does, but with the given Kafka timestamps."""
    await ensure_topics(kafka, [kafka.topic])
    producer = durable_producer(kafka, "test-replay-fill")
    await producer.start()
    ids = []
    try:
        for payload, moment in items:
            call_id, value = encode(payload)
            await producer.send_and_wait(
                kafka.topic, value, key=call_id.encode(), timestamp_ms=ms(moment)
            )
            ids.append(call_id)
    finally:
        await producer.stop()
    return ids


async def topic_records(kafka: KafkaSettings, topic: str, expect: int) -> list[RawRecord]:
    return [r async for r in read_topic(kafka, topic, idle_timeout=10.0, limit=expect)]


def counts_between(
    records: Sequence[RawRecord], since: datetime, until: datetime | None
) -> dict[int, int]:
    counts: dict[int, int] = {}
    for r in records:
        if r.timestamp_ms >= ms(since) and (until is None or r.timestamp_ms < ms(until)):
            counts[r.partition] = counts.get(r.partition, 0) + 1
    return counts


async def committed(kafka: KafkaSettings, group: str) -> dict[int, int]:
    async with KafkaInspector(kafka) as inspector:
        partitions = await inspector.partitions(kafka.topic)
        return await inspector.committed(group, kafka.topic, partitions)


async def end_offsets(kafka: KafkaSettings) -> dict[int, int]:
    async with KafkaInspector(kafka) as inspector:
        partitions = await inspector.partitions(kafka.topic)
        _, end = await inspector.log_offsets(kafka.topic, partitions)
        return end


def runner_settings(kafka: KafkaSettings, group: str) -> RunnerSettings:
    return RunnerSettings(group_id=group, topic=kafka.topic, poll_timeout_seconds=0.2)


async def replay(
    kafka: KafkaSettings,
    group: str,
    since: datetime,
    until: datetime | None = None,
    *,
    consumer: str = "storage",
    env: dict[str, str] | None = None,
    **options: Any,
) -> tuple[int, str, str]:
    """`replay_consumer` for `group` on the test's topic: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = await replay_consumer(
        kafka,
        consumer,
        since,
        until,
        env=env or {},
        settings=runner_settings(kafka, group),
        out=out,
        err=err,
        **options,
    )
    return code, out.getvalue(), err.getvalue()


async def consume_all(consumer: Consumer, kafka: KafkaSettings, group: str) -> None:
    """Run `consumer` in `group` until the group has committed everything on the topic."""
    end = await end_offsets(kafka)

    async def caught_up() -> bool:
        done = await committed(kafka, group)
        return all(done.get(p, 0) >= o for p, o in end.items())

    async with running(consumer, kafka, group, poll_timeout_seconds=0.2):
        await eventually(caught_up, timeout=60)

    async def left() -> bool:
        # The last member's leave takes the group through a rebalance to Empty; replay
        # refuses to touch a group until it is there.
        async with KafkaInspector(kafka) as inspector:
            return not (await inspector.group(group)).active

    await eventually(left)


def sqlite_backend(path: Path) -> StorageBackend:
    return open_backend(StorageSettings(sqlite_path=path))


def table_rows(text: str) -> dict[int, tuple[int, int, int, str]]:
    """partition -> (from-offset, to-offset, records, note) from the printed plan."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(?:\S+)\s+(?:\S+)\s*(.*)$", line)
        if match:
            p, start, stop, count, note = match.groups()
            rows[int(p)] = (int(start), int(stop), int(count), note)
    return rows


def ordered_reports(count: int, at: datetime) -> list[tuple[dict[str, Any], datetime]]:
    # A millisecond apart keeps every partition's timestamps increasing with its offsets.
    return [(sample_report(), at + timedelta(milliseconds=i)) for i in range(count)]


# -- time parsing --------------------------------------------------------------------------


def test_times_are_utc_unless_a_zone_is_given() -> None:
    assert parse_time("2025-08-20") == datetime(2025, 8, 20, tzinfo=UTC)
    assert parse_time("2025-08-20T09:30:00Z") == datetime(2025, 8, 20, 9, 30, tzinfo=UTC)
    assert parse_time("2025-08-20T11:30:00+02:00") == datetime(2025, 8, 20, 9, 30, tzinfo=UTC)


# -- replay through a consumer's group -------------------------------------------------------


async def test_dry_run_prints_per_partition_counts_and_changes_nothing(
    kafka: KafkaSettings,
) -> None:
    await produce_at(
        kafka,
        ordered_reports(8, NOW - 3 * HOUR)
        + ordered_reports(8, NOW - 2 * HOUR)
        + ordered_reports(8, NOW - HOUR),
    )
    group = f"g-dry-{uuid.uuid4().hex[:8]}"
    await consume_all(Recorder(), kafka, group)
    before = await committed(kafka, group)
    records = await topic_records(kafka, kafka.topic, expect=24)
    since, until = NOW - 2.5 * HOUR, NOW - 1.5 * HOUR

    code, out, err = await replay(kafka, group, since, until, dry_run=True)

    assert code == EXIT_OK, err
    rows = table_rows(out)
    expected = counts_between(records, since, until)
    assert sum(expected.values()) == 8
    assert set(rows) == set(range(kafka.partitions))
    assert {p: row[2] for p, row in rows.items() if row[2]} == expected
    for p, (start, stop, count, _) in rows.items():
        in_range = [
            r.offset
            for r in records
            if r.partition == p and ms(since) <= r.timestamp_ms < ms(until)
        ]
        if in_range:
            assert (start, stop) == (min(in_range), max(in_range) + 1)
        assert stop - start == count
    assert "total: 8 records" in out
    assert "dry run: nothing changed" in out
    assert await committed(kafka, group) == before


async def test_replay_refuses_while_the_group_is_active(kafka: KafkaSettings) -> None:
    await produce_at(kafka, ordered_reports(4, NOW - 2 * HOUR))
    group = f"g-busy-{uuid.uuid4().hex[:8]}"
    consumer = Recorder()
    async with running(consumer, kafka, group, poll_timeout_seconds=0.2):

        async def stable() -> bool:
            async with KafkaInspector(kafka) as inspector:
                state = await inspector.group(group)
            if state.state != "Stable" or len(consumer.seen) != 4:
                return False
            # Handled is not yet committed: wait for the commit too.
            return sum((await committed(kafka, group)).values()) == 4

        await eventually(stable)
        before = await committed(kafka, group)
        code, _, err = await replay(kafka, group, NOW - 3 * HOUR)
        assert code == EXIT_REFUSED
        assert "refusing to replay" in err
        assert "active (Stable, 1 member(s))" in err
        assert await committed(kafka, group) == before


async def test_partitions_with_no_record_after_from_are_left_alone(kafka: KafkaSettings) -> None:
    old = await produce_at(kafka, ordered_reports(12, NOW - 3 * HOUR))
    [late] = await produce_at(kafka, [(sample_report(), NOW - HOUR)])
    group = f"g-rewind-{uuid.uuid4().hex[:8]}"
    await consume_all(Recorder(), kafka, group)
    before = await committed(kafka, group)
    records = await topic_records(kafka, kafka.topic, expect=len(old) + 1)
    [late_record] = [r for r in records if r.key == late.encode()]

    code, out, err = await replay(kafka, group, NOW - 2 * HOUR)

    assert code == EXIT_OK, err
    rows = table_rows(out)
    for p, (start, _, count, note) in rows.items():
        if p == late_record.partition:
            assert (start, count) == (late_record.offset, 1)
        else:
            assert count == 0
            assert note == "no record after --from: nothing to replay"
    after = await committed(kafka, group)
    assert after == before | {late_record.partition: late_record.offset}
    assert "handles 1 record(s) from --from on" in out


async def test_rewind_never_moves_a_group_forward(kafka: KafkaSettings) -> None:
    single = dataclasses.replace(kafka, partitions=1)
    await produce_at(single, ordered_reports(12, NOW - 2 * HOUR))
    group = f"g-behind-{uuid.uuid4().hex[:8]}"
    # The group has handled two records, and --from selects the second half.
    await commit_group_offsets(single, group, single.topic, {0: 2})
    code, out, err = await replay(single, group, NOW - 2 * HOUR + timedelta(milliseconds=6))
    assert code == EXIT_OK, err
    assert table_rows(out) == {0: (6, 12, 6, "group has not reached --from yet: left where it is")}
    assert "nothing to move" in out
    assert await committed(single, group) == {0: 2}


async def test_a_fresh_group_starts_at_from_instead_of_the_log_start(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    await produce_at(kafka, ordered_reports(9, NOW - 3 * HOUR) + ordered_reports(9, NOW - HOUR))
    records = await topic_records(kafka, kafka.topic, expect=18)
    group = f"g-fresh-{uuid.uuid4().hex[:8]}"
    # A bounded replay first: it leaves the group at the log start, still new.
    code, _, _ = await replay(
        kafka,
        group,
        NOW - 4 * HOUR,
        NOW - 2 * HOUR,
        env={"CALLSTREAM_SQLITE_PATH": str(tmp_path / "callstream.db")},
        progress_interval=0.2,
    )
    assert code == EXIT_OK
    assert await committed(kafka, group) == dict.fromkeys(range(kafka.partitions), 0)

    code, out, err = await replay(kafka, group, NOW - 2 * HOUR)
    assert code == EXIT_OK, err
    expected = {}
    for p in range(kafka.partitions):
        mine = [r for r in records if r.partition == p]
        recent = [r.offset for r in mine if r.timestamp_ms >= ms(NOW - 2 * HOUR)]
        expected[p] = min(recent) if recent else len(mine)
    assert await committed(kafka, group) == expected
    assert "handles 9 record(s) from --from on" in out


async def bounded_replay_of(
    name: str,
    kafka: KafkaSettings,
    env: dict[str, str],
    registry: CollectorRegistry,
) -> tuple[int, str, dict[int, int], dict[int, int]]:
    """Produce 6 old and 3 recent reports, let `name` handle all nine in its group, then
    replay the 6 old ones through it. Returns the code, stdout, and the group's commits
    before and after."""
    await produce_at(kafka, ordered_reports(6, NOW - 2 * HOUR) + ordered_reports(3, NOW - HOUR / 2))
    group = f"g-{name}-{uuid.uuid4().hex[:8]}"
    build = {"storage": storage.build, "metrics": metrics.build}[name]
    await consume_all(build(env, CollectorRegistry()), kafka, group)
    before = await committed(kafka, group)
    code, out, err = await replay(
        kafka,
        group,
        NOW - 3 * HOUR,
        NOW - HOUR,
        registry=registry,
        progress_interval=0.2,
        consumer=name,
        env=env,
    )
    assert code == EXIT_OK, err
    assert re.search(r"replay \w+: 6/6 records \(100%\), \d+/s, 0s left", err)
    return code, out, before, await committed(kafka, group)


def restored(before: dict[int, int]) -> dict[int, int]:
    """What a bounded replay leaves: the same commits, and the log start (0 here) for
    partitions the group had never committed, where it would have started anyway."""
    return {p: before.get(p, 0) for p in range(6)}


async def test_replay_through_storage_leaves_row_count_unchanged(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    env = {"CALLSTREAM_SQLITE_PATH": str(tmp_path / "callstream.db")}
    registry = CollectorRegistry()
    _, out, before, after = await bounded_replay_of("storage", kafka, env, registry)

    assert "replayed 6 of 6 record(s) through storage (6 handed to the consumer)" in out
    assert after == restored(before), "the group's offsets go back to where they were"
    async with sqlite_backend(tmp_path / "callstream.db") as backend:
        assert await backend.count() == 9
    labels = {"backend": "sqlite"}
    assert registry.get_sample_value("callstream_storage_rows_written_total", labels) == 0
    assert registry.get_sample_value("callstream_storage_duplicates_total", labels) == 6


async def test_replay_through_metrics_counts_nothing_twice(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    env = {"CALLSTREAM_METRICS_STATE_PATH": str(tmp_path / "metrics.db")}
    registry = CollectorRegistry()
    _, out, before, after = await bounded_replay_of("metrics", kafka, env, registry)

    assert "replayed 6 of 6 record(s) through metrics (6 handed to the consumer)" in out
    assert after == restored(before)
    counted = sum(
        sample.value
        for family in registry.collect()
        if family.name == "callstream_calls"
        for sample in family.samples
        if sample.name == "callstream_calls_total"
    )
    assert counted == 0
    assert registry.get_sample_value("callstream_metrics_duplicates_ignored_total") == 6


# -- re-publishing from storage ------------------------------------------------------------


async def test_from_storage_puts_the_original_bytes_back(
    ingress: Client, kafka: KafkaSettings, tmp_path: Path
) -> None:
    base = datetime(2025, 8, 27, 11, 0, tzinfo=UTC)
    inside = [sample_report(eventTimestamp=ms(base + i * timedelta(minutes=10))) for i in range(4)]
    outside = [sample_report(eventTimestamp=ms(base + 2 * HOUR))]
    for payload in inside + outside:
        body = orjson.dumps(payload)
        resp = await ingress.post(WEBHOOK_PATH, data=body, headers=signed(body, TEST_SECRET))
        assert resp.status == 202, await resp.text()
    # consume_all reads the topic's end once, so everything must be there by then.
    await wait_drained(ingress)
    env = {"CALLSTREAM_SQLITE_PATH": str(tmp_path / "callstream.db")}
    await consume_all(storage.build(env, CollectorRegistry()), kafka, f"g-{uuid.uuid4().hex}")
    originals = {r.key: r for r in await topic_records(kafka, kafka.topic, expect=5)}

    fresh = dataclasses.replace(kafka, topic=f"{kafka.topic}.restored")
    out, err = io.StringIO(), io.StringIO()
    async with sqlite_backend(tmp_path / "callstream.db") as backend:
        code = await republish_from_storage(
            fresh, backend, base, base + HOUR, out=out, err=err, progress_interval=0.0
        )

    assert code == EXIT_OK, err.getvalue()
    assert "re-published 4 of 4 report(s)" in out.getvalue()
    assert "re-publish: 4/4 records (100%)" in err.getvalue()
    restored = await topic_records(kafka, fresh.topic, expect=4)
    assert sorted(r.key or b"" for r in restored) == sorted(p["callId"].encode() for p in inside)
    for record in restored:
        original = originals[record.key]
        assert record.value == original.value
        assert record.partition == original.partition  # same key, same partitioner
        rebuilt = RecordHeaders.parse(record.headers)
        assert rebuilt == RecordHeaders.parse(original.headers)
        assert rebuilt.event_type == "end-of-call-report"
        assert record.header("replayed-from") == "storage"


async def test_from_storage_dry_run_publishes_nothing(kafka: KafkaSettings, tmp_path: Path) -> None:
    async with sqlite_backend(tmp_path / "empty.db") as backend:
        out = io.StringIO()
        code = await republish_from_storage(
            kafka, backend, NOW - HOUR, None, out=out, err=io.StringIO(), dry_run=True
        )
    assert code == EXIT_OK
    assert out.getvalue().startswith("0 stored report(s) with event times from ")
    assert "dry run: nothing published" in out.getvalue()


# -- the command line ----------------------------------------------------------------------


async def test_replay_command_line_dry_run(kafka: KafkaSettings) -> None:
    await produce_at(kafka, ordered_reports(3, NOW - HOUR))
    since = (NOW - 2 * HOUR).strftime("%Y-%m-%dT%H:%M:%S")  # no zone: UTC
    code, out, err = await callstream(
        kafka, "replay", "--consumer", "storage", "--from", since, "--dry-run"
    )
    assert code == 0, err
    assert "group callstream-storage" in out
    assert "total: 3 records" in out


async def test_replay_command_line_refuses_a_bad_time(kafka: KafkaSettings) -> None:
    code, _, err = await callstream(kafka, "replay", "--consumer", "storage", "--from", "tuesday")
    assert code == 2
    assert "not an ISO-8601 time: 'tuesday'" in err


async def test_replay_from_a_relative_time_saves_the_offsets_restore_puts_back(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    await produce_at(kafka, ordered_reports(6, NOW - 3 * HOUR) + ordered_reports(4, NOW - HOUR / 2))
    group = f"g-relative-{uuid.uuid4().hex[:8]}"
    await consume_all(Recorder(), kafka, group)
    before = await committed(kafka, group)
    last_hour = counts_between(await topic_records(kafka, kafka.topic, 10), NOW - HOUR, None)
    saved = tmp_path / "offsets.json"
    env = os.environ | to_env(kafka) | {"CALLSTREAM_GROUP_ID": group}

    def cli(*args: str) -> tuple[int, str, str]:
        done = run_cli(*args, env=env)
        return done.returncode, done.stdout, done.stderr

    code, out, err = await asyncio.to_thread(
        cli, "replay", "--consumer", "metrics", "--from", "-1h", "--offsets-file", str(saved)
    )
    assert code == 0, err
    assert f"callstream replay --restore {saved}" in out
    # The group was at the end: it moved back by exactly the last hour's records.
    assert await committed(kafka, group) == {
        p: offset - last_hour.get(p, 0) for p, offset in before.items()
    }
    assert sum(last_hour.values()) == 4

    code, out, err = await asyncio.to_thread(cli, "replay", "--restore", str(saved))
    assert code == 0, err
    assert await committed(kafka, group) == before


async def test_restore_refuses_a_file_replay_did_not_write(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    bogus = tmp_path / "offsets.json"
    bogus.write_text('{"group": "x"}')
    code, _, err = await callstream(kafka, "replay", "--restore", str(bogus))
    assert code == 2
    assert f"{bogus} is not an offsets file written by replay" in err
