"""The runner for a consumer that also reads the events topic, on the real broker: one group
for both topics, each record to its handler, poison from either topic dead-lettered."""

from __future__ import annotations

import time
from collections.abc import Sequence

import orjson
from aiokafka.admin import AIOKafkaAdminClient

from consumers.contract import Consumer, Delivery, EventDelivery
from core.kafkasettings import KafkaSettings
from core.topicreader import read_topic
from schemas.codec import single_object_encoder
from schemas.normalise import normalise
from schemas.store import FLIREO_EVENT, default_store
from tests.support.paths import DATA
from tests.support.produce import encode, produce_raw, produce_reports, sample_report
from tests.support.runner import eventually, running


class Both(Consumer):
    name = "both"
    reads_events = True

    def __init__(self) -> None:
        self.reports: list[str] = []
        self.events: list[str | None] = []

    async def handle(self, batch: Sequence[Delivery]) -> None:
        self.reports += [d.report.call_id for d in batch]

    async def handle_events(self, batch: Sequence[EventDelivery]) -> None:
        self.events += [d.event.call_id for d in batch]


class ReportsOnly(Both):
    name = "reports-only"
    reads_events = False


def status_update_record() -> tuple[str, bytes]:
    body = orjson.loads((DATA / "payloads" / "vapi-status-update.json").read_bytes())
    normalised = normalise(body, received_at_ms=int(time.time() * 1000), request_id="ev-1")
    assert normalised.call_id is not None
    encoder = single_object_encoder(default_store().current(FLIREO_EVENT))
    return normalised.call_id, encoder.encode(normalised.record)


async def committed(kafka: KafkaSettings, group: str) -> dict[str, int]:
    admin = AIOKafkaAdminClient(**kafka.client_kwargs())
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    totals: dict[str, int] = {}
    for tp, meta in offsets.items():
        totals[tp.topic] = totals.get(tp.topic, 0) + meta.offset
    return totals


async def test_events_go_to_handle_events_and_poison_from_them_is_dead_lettered(
    kafka: KafkaSettings,
) -> None:
    reports = await produce_reports(kafka, [sample_report(), sample_report()])
    call, status = status_update_record()
    _, a_report = encode(sample_report())
    await produce_raw(
        kafka,
        [(call.encode(), status), (b"junk", b"not avro"), (b"misplaced", a_report)],
        topic=kafka.events_topic,
    )
    consumer = Both()

    async with running(consumer, kafka, "g-both"):
        await eventually(lambda: len(consumer.reports) == 2 and len(consumer.events) == 1)
        dead = [r async for r in read_topic(kafka, kafka.dlq_topic, idle_timeout=10, limit=2)]

    assert sorted(consumer.reports) == sorted(reports)
    assert consumer.events == [call]
    assert {d.key for d in dead} == {b"junk", b"misplaced"}
    assert {d.header("dlq.topic") for d in dead} == {kafka.events_topic}
    assert {d.header("dlq.consumer") for d in dead} == {"both"}
    misplaced = next(d for d in dead if d.key == b"misplaced")
    assert "end_of_call_report record on the events topic" in (misplaced.header("dlq.error") or "")
    assert await committed(kafka, "g-both") == {kafka.topic: 2, kafka.events_topic: 3}


async def test_a_consumer_that_does_not_read_events_never_sees_them(
    kafka: KafkaSettings,
) -> None:
    call, status = status_update_record()
    await produce_raw(kafka, [(call.encode(), status)], topic=kafka.events_topic)
    reports = await produce_reports(kafka, [sample_report()])
    consumer = ReportsOnly()

    async with running(consumer, kafka, "g-reports-only"):
        await eventually(lambda: len(consumer.reports) == 1)

    assert consumer.reports == reports
    assert consumer.events == []
    assert await committed(kafka, "g-reports-only") == {kafka.topic: 1}
