"""Putting real reports on a topic the way the ingress does (same encoder, same publisher)."""

from __future__ import annotations

import copy
import time
import uuid
from typing import Any

import orjson

from core.kafkasettings import KafkaSettings
from ingress.kafkapublisher import KafkaPublisher
from ingress.publisher import OutgoingRecord
from schemas.codec import single_object_encoder
from schemas.normalise import normalise
from schemas.store import default_store
from tests.support.samples import SAMPLE


def sample_report(call_id: str | None = None, **changes: Any) -> dict[str, Any]:
    """The flat sample with a fresh call id (and any top-level field changed)."""
    payload: dict[str, Any] = orjson.loads(SAMPLE.read_bytes())
    payload["callId"] = call_id or str(uuid.uuid4())
    payload.update(changes)
    return copy.deepcopy(payload)


def encode(payload: dict[str, Any], request_id: str = "test") -> tuple[str, bytes]:
    event = normalise(payload, received_at_ms=int(time.time() * 1000), request_id=request_id)
    assert event.record is not None
    assert event.call_id is not None
    encoder = single_object_encoder(default_store().current("end_of_call_report"))
    return event.call_id, encoder.encode(event.record)


async def produce_raw(
    kafka: KafkaSettings, values: list[tuple[bytes | None, bytes]], topic: str | None = None
) -> None:
    publisher = KafkaPublisher(kafka, client_id="test-producer")
    await publisher.start()
    try:
        for key, value in values:
            await publisher.publish(OutgoingRecord(topic or kafka.topic, key, value, ()), 30.0)
    finally:
        await publisher.stop()


async def produce_reports(kafka: KafkaSettings, payloads: list[dict[str, Any]]) -> list[str]:
    encoded = [encode(p) for p in payloads]
    await produce_raw(kafka, [(call_id.encode(), value) for call_id, value in encoded])
    return [call_id for call_id, _ in encoded]
