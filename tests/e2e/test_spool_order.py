"""Order per call, not global: a report goes to Kafka directly unless its own call has
records in the spool, and then it queues behind them; and once Kafka has missed an
acknowledgement, reports go straight to the spool until the drainer sees Kafka take a batch
again. On a broker of the test's own.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from callstream.consumerstatus import KafkaInspector
from callstream.localkafka import LocalKafka
from callstream.ports import free_port
from core.signing import WEBHOOK_PATH
from core.topicreader import read_range
from ingress.kafkapublisher import KafkaPublisher, PublishUnavailable
from ingress.publisher import DurablePublisher, OutgoingRecord, encode_record
from ingress.spool import Spool
from tests.conftest import start_ingress, wait_drained
from tests.e2e.test_ingress_faults import (
    assert_all_acknowledged_landed,
    landed,
    metric,
    post,
    settings_for,
    topics,
    wait_durable,
)
from tests.support.kafka import private_broker
from tests.support.runner import eventually

pytestmark = pytest.mark.slow

# Enough that the drainer is still busy with them when the new run takes its first reports.
BACKLOG = 20_000


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    with private_broker(tmp_path_factory.mktemp("order-kafka") / "home") as local:
        yield local


async def spool_backlog(spool_dir: Path, topic: str, count: int) -> None:
    """`count` records of calls of their own, spooled as a run with Kafka away would have."""
    spool = Spool(spool_dir, max_bytes=1 << 30, max_age_seconds=3600)
    await spool.open()
    try:
        await asyncio.gather(
            *(
                spool.append(
                    encode_record(OutgoingRecord(topic, uuid.uuid4().bytes, b"backlog", ()))
                )
                for _ in range(count)
            )
        )
    finally:
        await spool.close()


async def test_a_call_with_nothing_spooled_is_not_held_behind_other_calls(
    broker: LocalKafka, tmp_path: Path
) -> None:
    """Oracle: the spool holds a backlog of other calls and, behind it, the first version of
    call A. After a restart with Kafka back, A's second version is spooled behind its first
    (and lands after it on the topic), while a report of call B, with nothing spooled, goes
    straight to Kafka although the backlog is still draining."""
    kafka = topics(broker.bootstrap)
    spool_dir = tmp_path / "spool"
    await spool_backlog(spool_dir, kafka.events_topic, BACKLOG)

    unreachable = replace(kafka, bootstrap_servers=f"127.0.0.1:{free_port()}")
    call_a, call_b = str(uuid.uuid4()), str(uuid.uuid4())
    client = await start_ingress(settings_for(unreachable, spool_dir))
    try:
        first = await post(client, WEBHOOK_PATH, call_a, "a-1")
    finally:
        await client.close()
    assert (first.status, first.durable) == (202, "spool")

    # A deadline long enough to connect on a loaded machine: B must not be spooled for
    # want of a connection.
    client = await start_ingress(settings_for(kafka, spool_dir, kafka_ack_deadline_seconds=8.0))
    try:
        second = await post(client, WEBHOOK_PATH, call_a, "a-2")
        other = await post(client, WEBHOOK_PATH, call_b, "b-1")
        state = await (await client.get("/readyz")).json()
        await wait_drained(client, timeout=120)
    finally:
        await client.close()
    assert (second.status, second.durable) == (202, "spool")
    assert state["spool"]["records"] > 0, "the backlog drained before B: nothing was tested"
    assert (other.status, other.durable) == (202, "kafka")
    got = await landed(kafka)
    assert got.by_call[call_a][:2] == ["a-1", "a-2"]
    assert_all_acknowledged_landed([first, second, other], got)


MISSED = "callstream_ingress_kafka_ack_missed_total"


async def test_after_a_missed_acknowledgement_no_report_waits_on_kafka_until_it_is_back(
    broker: LocalKafka, tmp_path: Path
) -> None:
    """Oracle: with the broker hung (SIGSTOP), twenty reports of twenty different calls
    (none held back by another's spooled records) are all spooled, and only the first of
    them waited out the acknowledgement deadline on Kafka. After SIGCONT the drainer's
    batch turns Kafka back on: /readyz says "kafka" again, a new report is acknowledged by
    Kafka, and every acknowledged report is on the topic."""
    kafka = topics(broker.bootstrap)
    client = await start_ingress(settings_for(kafka, tmp_path / "spool"), CollectorRegistry())
    try:
        await wait_durable(client, "kafka")
        warm = await post(client, WEBHOOK_PATH, str(uuid.uuid4()), "warm")
        await wait_drained(client)
        missed_before = metric(await (await client.get("/metrics")).text(), MISSED)

        broker.pause()
        try:
            hung = [
                await post(client, WEBHOOK_PATH, str(uuid.uuid4()), f"hung-{i:02d}")
                for i in range(20)
            ]
            missed = metric(await (await client.get("/metrics")).text(), MISSED)
        finally:
            broker.resume()
        assert {(s.status, s.durable) for s in hung} == {(202, "spool")}
        assert missed - missed_before == 1

        await wait_durable(client, "kafka")
        back = await post(client, WEBHOOK_PATH, str(uuid.uuid4()), "back")
        assert (back.status, back.durable) == (202, "kafka")
        await wait_drained(client)
    finally:
        await client.close()
    assert_all_acknowledged_landed([warm, *hung, back], await landed(kafka))


async def test_a_report_whose_spooling_outlasts_its_deadline_still_holds_its_call_back(
    broker: LocalKafka, tmp_path: Path
) -> None:
    """Oracle: with Kafka hung, report A of call X is handed to the spool, whose fsync is held
    until A's publish has given up (a 503); the spool still writes A. Kafka comes back and
    the drainer turns it on again while A's write is still held. Report B of call X must
    then queue behind A in the spool, not go to Kafka ahead of it: X lands as A, B."""
    kafka = topics(broker.bootstrap)
    held = threading.Event()
    hold_next = threading.Event()

    def sync(fd: int) -> None:
        os.fdatasync(fd)
        if hold_next.is_set():
            hold_next.clear()
            held.wait(60)

    spool = Spool(tmp_path / "spool", max_bytes=1 << 26, max_age_seconds=3600, sync=sync)
    publisher = DurablePublisher(
        KafkaPublisher(kafka), spool, ack_deadline_seconds=2.0, publish_timeout_seconds=4.0
    )
    call_x = uuid.uuid4().bytes

    def report(key: bytes, value: bytes) -> OutgoingRecord:
        return OutgoingRecord(kafka.topic, key, value, ())

    await publisher.start()
    try:
        assert await publisher.kafka.wait_connected(60.0), "never connected to the broker"
        assert await publisher.publish(report(uuid.uuid4().bytes, b"warm")) == "kafka"
        broker.pause()
        try:
            assert await publisher.publish(report(uuid.uuid4().bytes, b"y")) == "spool"
            hold_next.set()
            with pytest.raises(PublishUnavailable):
                await publisher.publish(report(call_x, b"a"))
        finally:
            broker.resume()
        await eventually(lambda: publisher.readiness().durable == "kafka", timeout=120)
        second = asyncio.create_task(publisher.publish(report(call_x, b"b")))
        await asyncio.sleep(0.5)
        held.set()
        await second
        await eventually(publisher.spool.empty, timeout=120)
    finally:
        held.set()
        await publisher.stop()
    async with KafkaInspector(kafka) as look:
        start, end = await look.log_offsets(kafka.topic, await look.partitions(kafka.topic))
    got = [raw.value async for raw in read_range(kafka, kafka.topic, start, end)]
    assert [v for v in got if v in (b"a", b"b")] == [b"a", b"b"]
