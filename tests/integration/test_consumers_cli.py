"""`callstream consumers` against the real broker: group state, members and lag."""

from __future__ import annotations

import asyncio
import io
import uuid

import orjson
from prometheus_client import CollectorRegistry

from callstream.consumerstatus import (
    ConsumerStatus,
    GroupState,
    PartitionLag,
    Watched,
    consumer_statuses,
    consumers_command,
    render_table,
)
from consumers.catalog import CONSUMERS
from consumers.runner import Runner, RunnerSettings
from consumers.telemetry import RunnerMetrics
from core.kafkasettings import KafkaSettings
from schemas.codec import Decoder
from schemas.store import default_store
from tests.support.cli import callstream
from tests.support.produce import produce_reports, sample_report
from tests.support.runner import Recorder, eventually


def groups(**names: str) -> dict[str, Watched]:
    return {name: Watched(group, f"the {name} consumer") for name, group in names.items()}


async def test_consumers_shows_state_members_and_lag(kafka: KafkaSettings) -> None:
    await produce_reports(kafka, [sample_report() for _ in range(5)])
    busy, idle = f"g-busy-{uuid.uuid4().hex[:8]}", f"g-never-{uuid.uuid4().hex[:8]}"
    watched = groups(recorder=busy, never=idle)
    consumer = Recorder()
    runner = Runner(
        consumer,
        kafka,
        RunnerSettings(group_id=busy, topic=kafka.topic, poll_timeout_seconds=0.2),
        RunnerMetrics(CollectorRegistry(), consumer.name),
        Decoder(default_store()),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:

        async def caught_up() -> bool:
            [recorder, _] = await consumer_statuses(kafka, watched)
            return recorder.group.state == "Stable" and recorder.lag == 0

        await eventually(caught_up)
        [recorder, never] = await consumer_statuses(kafka, watched)
        assert (recorder.group.state, recorder.group.members, recorder.lag) == ("Stable", 1, 0)
        # A group that never ran is Dead and would have to read everything retained.
        assert (never.group.state, never.group.members, never.lag) == ("Dead", 0, 5)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)

    await produce_reports(kafka, [sample_report() for _ in range(3)])
    [recorder, _] = await consumer_statuses(kafka, watched)
    assert (recorder.group.state, recorder.group.members, recorder.lag) == ("Empty", 0, 3)
    assert sum(p.end for p in recorder.partitions) == 8
    assert len(recorder.partitions) == kafka.partitions


async def test_consumers_json_lists_every_partition(kafka: KafkaSettings) -> None:
    await produce_reports(kafka, [sample_report() for _ in range(2)])
    out = io.StringIO()
    group = f"g-json-{uuid.uuid4().hex[:8]}"
    assert await consumers_command(kafka, out, as_json=True, consumers=groups(x=group)) == 0
    [line] = out.getvalue().splitlines()
    entry = orjson.loads(line)
    assert entry["name"] == "x"
    assert entry["group_id"] == group
    assert entry["state"] == "Dead"
    assert entry["members"] == 0
    assert entry["lag"] == 2
    assert entry["topic"] == kafka.topic
    assert sorted(p["partition"] for p in entry["partitions"]) == list(range(kafka.partitions))
    assert all(p["committed"] is None for p in entry["partitions"])


async def test_consumers_on_a_topic_that_does_not_exist_yet(kafka: KafkaSettings) -> None:
    [status] = await consumer_statuses(kafka, groups(x=f"g-{uuid.uuid4().hex[:8]}"))
    assert (status.group.state, status.lag, status.partitions) == ("Dead", 0, ())


def test_table_has_one_row_per_consumer_with_lag_right_aligned_and_its_origin() -> None:
    statuses = [
        ConsumerStatus(
            "storage",
            "",
            "t",
            GroupState("callstream-storage", "Stable", 2),
            (PartitionLag(0, 0, 1200, 200), PartitionLag(1, 0, 30, None)),
        ),
        ConsumerStatus(
            "crm", "", "t", GroupState("callstream-crm", "Dead", 0), (), "crm-forward 0.1.0"
        ),
    ]
    assert render_table(statuses).splitlines() == [
        "CONSUMER  GROUP               STATE   MEMBERS   LAG  ORIGIN",
        "storage   callstream-storage  Stable        2  1030  built-in",
        "crm       callstream-crm      Dead          0     0  crm-forward 0.1.0",
    ]


def test_lag_counts_from_the_log_start_when_retention_passed_the_commit() -> None:
    assert PartitionLag(0, beginning=100, end=150, committed=40).lag == 50
    assert PartitionLag(0, beginning=100, end=150, committed=None).lag == 50
    assert PartitionLag(0, beginning=100, end=150, committed=150).lag == 0


async def test_command_line_lists_the_registered_consumers(kafka: KafkaSettings) -> None:
    code, stdout, stderr = await callstream(kafka, "consumers", "--json")
    assert code == 0, stderr
    listed = [orjson.loads(line) for line in stdout.splitlines()]
    assert [c["name"] for c in listed] == list(CONSUMERS)
    assert {c["origin"] for c in listed} == {"built-in"}
    assert [c["group_id"] for c in listed] == [f"callstream-{name}" for name in CONSUMERS]
