"""Every documented payload shape, posted signed to a real ingress with a real broker behind it:
the answer each sender expects, and for reports the typed values on the topic.

The payloads are tests/data/payloads (written from the sources docs/payload-formats.md names,
with made-up values); the expected values are those of tests/data/payloads/INDEX.md.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from callstream.consumerstatus import TopicMissingError
from core.kafkasettings import KafkaSettings
from core.settings import SettingsError
from core.signing import WEBHOOK_PATH
from ingress.settings import IngressSettings
from schemas.report import CallReport
from tests.conftest import TEST_SECRET, Client, start_ingress, wait_drained
from tests.signing import signed
from tests.support.paths import DATA
from tests.support.topics import Landed, read_all

PAYLOADS = DATA / "payloads"
RECEIVED = "receive time"


def _load(name: str) -> bytes:
    return (PAYLOADS / name).read_bytes()


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@dataclass(frozen=True)
class Expected:
    """One report row of INDEX.md (tests/data/payloads/expected-reports.json)."""

    call_id: str
    source_format: str
    event_time: str  # ISO UTC, or RECEIVED
    turns: int
    duration: float | None = None
    summary: str | None = None
    success_evaluation: str | None = None
    structured_keys: tuple[str, ...] | None = None
    from_number: str | None = None
    to_number: str | None = None
    ended_reason: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    cost: float | None = None
    agent_id: str | None = None
    agent_name: str | None = None


def _expected(row: dict[str, Any]) -> Expected:
    keys = row.get("structured_keys")
    return Expected(**row | {"structured_keys": None if keys is None else tuple(keys)})


# The report rows of INDEX.md, one JSON object per fixture (absent keys: not in the payload).
REPORTS: dict[str, Expected] = {
    name: _expected(row)
    for name, row in orjson.loads((PAYLOADS / "expected-reports.json").read_bytes()).items()
}
NOTIFICATIONS: dict[str, str | None] = {
    "flireo-flat-status-update.json": "7b1e2c94-3f0a-4d6b-9a51-0c2d8e4f6a13",
    "flireo-flat-status-update-debugging.json": "0e9d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b",
    "flireo-nested-camel-status-update.json": "3a8f1d2e-6b7c-4e9f-a0b1-c2d3e4f5a6b7",
    "flireo-nested-snake-status-update.json": "c4d5e6f7-0809-4a1b-9c2d-3e4f5a6b7c8d",
    "flireo-sdk-minimal-status-update.json": None,
    "vapi-status-update.json": "b7c8d9e0-f1a2-4b3c-9d4e-5f6a7b8c9d0e",
    "vapi-transcript.json": "b7c8d9e0-f1a2-4b3c-9d4e-5f6a7b8c9d0e",
    "vapi-hang.json": "b7c8d9e0-f1a2-4b3c-9d4e-5f6a7b8c9d0e",
    "vapi-conversation-update.json": "b7c8d9e0-f1a2-4b3c-9d4e-5f6a7b8c9d0e",
    "vapi-speech-update.json": "b7c8d9e0-f1a2-4b3c-9d4e-5f6a7b8c9d0e",
    "vapi-user-interrupted.json": "b7c8d9e0-f1a2-4b3c-9d4e-5f6a7b8c9d0e",
}
NOT_AVAILABLE = "This tool is not available."
# fixture -> (status, body of a 200) with the default settings.
REQUESTS: dict[str, tuple[int, Any]] = {
    "flireo-flat-assistant-request.json": (422, None),
    "flireo-nested-camel-assistant-request.json": (200, {}),
    "flireo-nested-snake-assistant-request.json": (200, {}),
    "vapi-assistant-request.json": (422, None),
    "flireo-flat-tool-calls.json": (
        200,
        {
            "results": [
                {"toolCallId": "call_Q1w2E3r4T5y6U7i8O9p0", "result": NOT_AVAILABLE},
                {"toolCallId": "call_Z9x8C7v6B5n4M3a2S1d0", "result": NOT_AVAILABLE},
            ]
        },
    ),
    "flireo-nested-camel-tool-calls.json": (200, {"error": NOT_AVAILABLE}),
    "flireo-nested-snake-tool-calls.json": (200, {"error": NOT_AVAILABLE}),
    "vapi-tool-calls.json": (
        200,
        {
            "results": [
                {
                    "toolCallId": "call_hotel_0001",
                    "name": "check_availability",
                    "error": NOT_AVAILABLE,
                }
            ]
        },
    ),
    "vapi-tool-calls-docs-example.json": (
        200,
        {"results": [{"toolCallId": "tc_mail_01", "name": "sendEmail", "error": NOT_AVAILABLE}]},
    ),
}


def test_every_payload_in_the_data_directory_is_covered() -> None:
    covered = {*REPORTS, *NOTIFICATIONS, *REQUESTS, "flireo-sdk-minimal-no-call-id.json"}
    payloads = {path.name for path in PAYLOADS.glob("*.json")} - {"expected-reports.json"}
    assert payloads == covered


async def _records(kafka: KafkaSettings, topic: str) -> list[Landed]:
    """What is on `topic`; nothing when nothing ever created it (the ingress creates a topic
    when it first publishes there)."""
    try:
        return await read_all(kafka, topic)
    except TopicMissingError:
        return []


async def _post(client: Client, name: str) -> tuple[int, Any]:
    body = _load(name)
    resp = await client.post(WEBHOOK_PATH, data=body, headers=signed(body, TEST_SECRET))
    return resp.status, await resp.json()


@pytest.mark.parametrize("fixture", sorted(REPORTS))
async def test_end_of_call_report_lands_with_the_documented_values(
    ingress: Client, kafka: KafkaSettings, fixture: str
) -> None:
    want = REPORTS[fixture]
    before = datetime.now(UTC).replace(microsecond=0)

    status, answer = await _post(ingress, fixture)

    assert status == 202, answer
    [landed] = await read_all(kafka, kafka.topic)
    assert landed.raw.key == want.call_id.encode()
    report = CallReport.from_record(landed.decoded.record)
    assert report.source_payload() == orjson.loads(_load(fixture))
    got = {
        "call_id": report.call_id,
        "source_format": report.source_format,
        "duration": report.duration_seconds,
        "turns": len(report.transcript_turns or []),
        "summary": report.summary,
        "success_evaluation": report.success_evaluation,
        "structured_keys": None
        if report.structured_data is None
        else tuple(report.structured_data),
        "from_number": report.from_number,
        "to_number": report.to_number,
        "ended_reason": report.ended_reason,
        "started_at": report.started_at,
        "ended_at": report.ended_at,
        "cost": report.cost,
        "agent_id": report.agent_id,
        "agent_name": report.agent_name,
    }
    expected = {f.name: getattr(want, f.name) for f in dataclasses.fields(want)}
    del expected["event_time"]
    for name in ("started_at", "ended_at"):
        expected[name] = None if expected[name] is None else _utc(expected[name])
    assert got == expected
    if want.event_time == RECEIVED:
        assert report.event_time_source == "received"
        assert before <= report.event_time <= datetime.now(UTC)
        assert report.event_time == report.received_at
    else:
        assert report.event_time_source == "sent"
        assert report.event_time == _utc(want.event_time)


async def test_vapi_turns_are_typed_with_their_times(ingress: Client, kafka: KafkaSettings) -> None:
    status, _ = await _post(ingress, "vapi-end-of-call.json")

    assert status == 202
    [landed] = await read_all(kafka, kafka.topic)
    report = CallReport.from_record(landed.decoded.record)
    assert report.transcript_turns is not None
    assert report.transcript_turns[0] == {
        "role": "assistant",
        "text": "Hotel Demo, this is Mila. How can I help?",
        "start_ms": 1767772801200,
        "end_ms": 1767772803400,
        "seconds_from_start": 0.7,
    }
    assert [t["role"] for t in report.transcript_turns] == ["assistant", "user"] * 2 + ["assistant"]
    assert report.costs is not None
    assert len(report.costs) == 6
    assert report.recording_url == "https://storage.example.invalid/vapi/b7c8d9e0-mono.wav"


@pytest.mark.parametrize("fixture", sorted(NOTIFICATIONS))
async def test_notification_is_accepted_onto_the_events_topic(
    ingress: Client, kafka: KafkaSettings, fixture: str
) -> None:
    status, answer = await _post(ingress, fixture)

    assert status == 202, answer
    assert answer["topic"] == kafka.events_topic
    [landed] = await read_all(kafka, kafka.events_topic)
    assert landed.decoded.record["call_id"] == NOTIFICATIONS[fixture]
    assert orjson.loads(landed.decoded.record["body_json"]) == orjson.loads(_load(fixture))
    assert await _records(kafka, kafka.topic) == []


@pytest.mark.parametrize("fixture", sorted(REQUESTS))
async def test_request_gets_its_documented_answer_after_it_is_kept(
    ingress: Client, kafka: KafkaSettings, fixture: str
) -> None:
    want_status, want_body = REQUESTS[fixture]

    status, answer = await _post(ingress, fixture)

    assert status == want_status, answer
    if want_status == 200:
        assert answer == want_body
    else:
        assert answer["type"] == "urn:callstream:problem:unsupported-event"
        assert "_ASSISTANT_REQUEST_REPLY" in answer["detail"]
    [landed] = await read_all(kafka, kafka.events_topic)
    assert landed.decoded.name == "flireo_event"
    assert orjson.loads(landed.decoded.record["body_json"]) == orjson.loads(_load(fixture))


async def test_report_without_a_call_id_is_refused_and_kept_in_the_quarantine(
    ingress: Client, kafka: KafkaSettings
) -> None:
    status, answer = await _post(ingress, "flireo-sdk-minimal-no-call-id.json")

    assert status == 422
    assert answer["pointer"] == "/message/call/id"
    assert await _records(kafka, kafka.topic) == []
    assert await _records(kafka, kafka.events_topic) == []
    # It cannot be keyed, so it is not published; but it is not lost either.
    await wait_drained(ingress)
    [kept] = await _records(kafka, kafka.rejected_topic)
    assert kept.decoded.record["request_id"] == answer["requestId"]
    assert kept.decoded.record["body"] == _load("flireo-sdk-minimal-no-call-id.json")


@pytest.fixture
async def configured(ingress_settings: IngressSettings) -> AsyncIterator[Client]:
    settings = dataclasses.replace(
        ingress_settings,
        flat_assistant_request_reply='{"assistant": {"firstMessage": "Hallo"}}',
        vapi_assistant_request_reply='{"assistantId": "fallback-assistant"}',
        assistant_request_reply='{"maxDurationSeconds": 300}',
        tool_call_reply="Niet beschikbaar.",
    )
    client = await start_ingress(settings)
    try:
        yield client
    finally:
        await client.close()


async def test_configured_replies_answer_every_format(configured: Client) -> None:
    assert await _post(configured, "flireo-flat-assistant-request.json") == (
        200,
        {"assistant": {"firstMessage": "Hallo"}},
    )
    assert await _post(configured, "vapi-assistant-request.json") == (
        200,
        {"assistantId": "fallback-assistant"},
    )
    assert await _post(configured, "flireo-nested-snake-assistant-request.json") == (
        200,
        {"maxDurationSeconds": 300},
    )
    assert await _post(configured, "flireo-nested-camel-tool-calls.json") == (
        200,
        {"error": "Niet beschikbaar."},
    )


@pytest.fixture
async def kafka_away(ingress_settings: IngressSettings, tmp_path: Path) -> AsyncIterator[Client]:
    # Nothing listens on port 9 (discard): every record has to go through the spool.
    kafka = dataclasses.replace(ingress_settings.kafka, bootstrap_servers="127.0.0.1:9")
    settings = dataclasses.replace(
        ingress_settings, kafka=kafka, spool_dir=tmp_path / "spool", kafka_ack_deadline_seconds=0.5
    )
    client = await start_ingress(settings)
    try:
        yield client
    finally:
        await client.close()


async def test_request_is_answered_within_the_deadline_while_kafka_is_away(
    kafka_away: Client,
) -> None:
    started = time.monotonic()

    status, answer = await _post(kafka_away, "flireo-nested-camel-assistant-request.json")

    assert (status, answer) == (200, {})
    assert time.monotonic() - started < 4.0
    ready = await (await kafka_away.get("/readyz")).json()
    assert ready["spool"]["records"] == 1


@pytest.mark.parametrize(
    "variable", ["CALLSTREAM_ASSISTANT_REQUEST_REPLY", "CALLSTREAM_VAPI_ASSISTANT_REQUEST_REPLY"]
)
@pytest.mark.parametrize("value", ["[1]", "not json", '"text"'])
def test_a_reply_that_is_not_a_json_object_stops_the_start_naming_its_variable(
    variable: str, value: str
) -> None:
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:9")
    with pytest.raises(SettingsError, match=variable):
        IngressSettings.from_env({variable: value}, kafka=kafka)


@pytest.mark.parametrize(
    ("event_type", "status", "body"),
    [
        ("knowledge-base-request", 200, {"documents": []}),
        ("transfer-destination-request", 422, None),
    ],
)
async def test_vapi_requests_without_a_fixture_get_their_neutral_answer_or_422(
    ingress: Client, kafka: KafkaSettings, event_type: str, status: int, body: Any
) -> None:
    payload = orjson.dumps({"message": {"type": event_type, "call": {"id": "kb-1"}}})

    resp = await ingress.post(WEBHOOK_PATH, data=payload, headers=signed(payload, TEST_SECRET))

    assert resp.status == status
    if body is not None:
        assert await resp.json() == body
    [landed] = await read_all(kafka, kafka.events_topic)
    assert landed.decoded.record["call_id"] == "kb-1"
    assert landed.decoded.record["source"]["format"] == "VAPI"
