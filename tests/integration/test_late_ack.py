"""A report that waits out Kafka's acknowledgement deadline while Kafka acknowledges other
reports is spooled on its own: Kafka is not away, so the reports after it still go to Kafka.

Under a flood of long calls the ingress's event loop is busy for long stretches, and a report
can be late for reasons of its own (here a topic whose metadata never comes) while Kafka
answers everything else in milliseconds. Only when Kafka acknowledged nothing during the
wait do all reports switch to the spool (tests/e2e/test_spool_order.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from core.kafkasettings import KafkaSettings
from ingress.kafkapublisher import KafkaPublisher
from ingress.publisher import DurablePublisher, OutgoingRecord
from ingress.spool import Spool
from ingress.telemetry import SpoolMetrics

# Long enough that a healthy broker on a loaded machine acknowledges the other report
# well within it; the stuck one waits it out in full.
DEADLINE = 5.0


def record(topic: str) -> OutgoingRecord:
    return OutgoingRecord(topic, str(uuid.uuid4()).encode(), b"report", ())


@pytest.fixture
async def publisher(kafka: KafkaSettings, tmp_path: Path) -> AsyncIterator[DurablePublisher]:
    metrics = SpoolMetrics(CollectorRegistry())
    spool = Spool(tmp_path / "spool", max_bytes=1 << 26, max_age_seconds=3600, metrics=metrics)
    durable = DurablePublisher(
        KafkaPublisher(kafka),
        spool,
        ack_deadline_seconds=DEADLINE,
        publish_timeout_seconds=DEADLINE + 10.0,
        metrics=metrics,
    )
    await durable.start()
    try:
        assert await durable.kafka.wait_connected(60.0), "never connected to the broker"
        yield durable
    finally:
        await durable.stop()


# Kafka answers every metadata request for it with INVALID_TOPIC_EXCEPTION, which the
# producer retries until the caller stops waiting: a report Kafka never acknowledges,
# while it acknowledges everything else.
STUCK_TOPIC = "callstream-test!stuck"


async def test_a_late_ack_while_kafka_acknowledges_others_spools_only_that_report(
    publisher: DurablePublisher, kafka: KafkaSettings
) -> None:
    """Oracle: the stuck report is spooled after waiting out the deadline; a report of
    another call acknowledged meanwhile shows Kafka is there, so the next report of yet
    another call still goes to Kafka, and the ingress still says Kafka is where reports
    go."""
    assert await publisher.publish(record(kafka.topic)) == "kafka"  # metadata, connections
    stuck = asyncio.create_task(publisher.publish(record(STUCK_TOPIC)))
    await asyncio.sleep(0.2)  # the stuck report is waiting on Kafka

    meanwhile = await publisher.publish(record(kafka.topic))

    assert not stuck.done(), "the stuck topic took the write: nothing was tested"
    assert meanwhile == "kafka"
    assert await stuck == "spool"
    assert await publisher.publish(record(kafka.topic)) == "kafka"
    assert publisher.readiness().durable == "kafka"
