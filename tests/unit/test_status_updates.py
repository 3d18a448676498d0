"""What a status-update event tells, read from the events topic's record, for every format
(the payloads of tests/data/payloads, values as their INDEX.md gives them)."""

from __future__ import annotations

import copy
import dataclasses
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from schemas.codec import Decoder, single_object_encoder
from schemas.events import FlireoEvent, StatusUpdate, status_update
from schemas.normalise import normalise
from schemas.store import FLIREO_EVENT, default_store
from tests.support.paths import DATA

RECEIVED_MS = 1_767_800_000_000
RECEIVED = datetime.fromtimestamp(RECEIVED_MS / 1000, UTC)
ENCODER = single_object_encoder(default_store().current(FLIREO_EVENT))
DECODER = Decoder(default_store())


def payload(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads((DATA / "payloads" / name).read_bytes())
    return loaded


def event_of(body: dict[str, Any]) -> FlireoEvent:
    """The event as a consumer gets it: normalised, through Avro, decoded."""
    normalised = normalise(body, received_at_ms=RECEIVED_MS, request_id="req-1")
    value = ENCODER.encode(normalised.record)
    return FlireoEvent.from_record(DECODER.decode_local(value).record)


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


EXPECTED: dict[str, StatusUpdate] = {
    "flireo-flat-status-update.json": StatusUpdate(
        "7b1e2c94-3f0a-4d6b-9a51-0c2d8e4f6a13",
        _utc("2025-10-09T10:22:40.700Z"),
        "sent",
        "in-progress",
        None,
        None,
        "+31687654321",
    ),
    "flireo-flat-status-update-debugging.json": StatusUpdate(
        "0e9d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b",
        _utc("2025-10-09T11:23:21.250Z"),
        "sent",
        "ended-with-debugging",
        None,
        "Assistant request returned no assistant configuration.",
        "+31611122233",
    ),
    "flireo-nested-camel-status-update.json": StatusUpdate(
        "3a8f1d2e-6b7c-4e9f-a0b1-c2d3e4f5a6b7",
        _utc("2026-01-15T09:40:04.000Z"),
        "sent",
        "ended-with-error",
        None,
        "TTS provider timeout",
        "+31633344455",
    ),
    "flireo-nested-snake-status-update.json": StatusUpdate(
        "c4d5e6f7-0809-4a1b-9c2d-3e4f5a6b7c8d",
        _utc("2026-02-03T14:04:31.000Z"),
        "sent",
        "in-progress",
        None,
        None,
        "+31644455566",
    ),
    "vapi-status-update.json": StatusUpdate(
        "b7c8d9e0-f1a2-4b3c-9d4e-5f6a7b8c9d0e",
        _utc("2026-01-07T08:00:23.400Z"),
        "sent",
        "ended",
        "assistant-ended-call",
        None,
        "+31666677788",
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_formats_status_update_is_read_whole(name: str) -> None:
    assert status_update(event_of(payload(name))) == EXPECTED[name]


@pytest.mark.parametrize(
    ("key", "where"),
    [("ended_reason", "message"), ("end_reason", "message"), ("endedReason", "call")],
)
def test_ended_reason_is_read_wherever_a_nested_format_puts_it(key: str, where: str) -> None:
    body = payload("flireo-nested-snake-status-update.json")
    body["message"]["call"]["status"] = "ended"
    target = body["message"] if where == "message" else body["message"]["call"]
    target[key] = "customer-ended-call"

    update = status_update(event_of(body))
    assert update is not None
    assert (update.status, update.ended_reason) == ("ended", "customer-ended-call")


def test_status_at_message_level_wins_over_the_calls() -> None:
    body = payload("vapi-status-update.json")
    body["message"]["status"] = "forwarding"
    update = status_update(event_of(body))
    assert update is not None
    assert update.status == "forwarding"


def test_an_update_without_a_time_takes_the_receive_time() -> None:
    body = payload("flireo-nested-snake-status-update.json")
    del body["message"]["timestamp"]
    update = status_update(event_of(body))
    assert update is not None
    assert (update.event_time, update.event_time_source) == (RECEIVED, "received")


def test_an_error_that_is_not_text_is_kept_as_its_json() -> None:
    body = payload("flireo-nested-camel-status-update.json")
    body["message"]["error"] = {"code": 504, "provider": "tts"}
    update = status_update(event_of(body))
    assert update is not None
    assert update.error == '{"code":504,"provider":"tts"}'


def test_a_web_call_update_has_no_caller_number() -> None:
    body = copy.deepcopy(payload("vapi-status-update.json"))
    del body["message"]["customer"]
    update = status_update(event_of(body))
    assert update is not None
    assert update.from_number is None


@pytest.mark.parametrize(
    "name",
    ["flireo-sdk-minimal-status-update.json", "vapi-transcript.json", "vapi-hang.json"],
)
def test_no_status_update_from_an_update_without_a_call_or_another_event(name: str) -> None:
    assert status_update(event_of(payload(name))) is None


def test_a_record_without_a_known_format_is_read_by_the_shape_of_its_body() -> None:
    # UNKNOWN is what a reader sees for a format symbol its schema does not know.
    flat = dataclasses.replace(
        event_of(payload("flireo-flat-status-update-debugging.json")), source_format="UNKNOWN"
    )
    vapi = dataclasses.replace(
        event_of(payload("vapi-status-update.json")), source_format="UNKNOWN"
    )

    assert status_update(flat) == EXPECTED["flireo-flat-status-update-debugging.json"]
    assert status_update(vapi) == EXPECTED["vapi-status-update.json"]
