"""The ingress against the real broker: what goes in comes out of the topic, exactly."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import io
import re
import time
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from core.kafkasettings import KafkaSettings
from core.signing import WEBHOOK_PATH
from ingress.app import create_app
from ingress.server import IngressRunner
from ingress.settings import IngressSettings
from schemas.headers import RecordHeaders
from schemas.report import CallReport
from schemas.store import default_store
from tests.conftest import TEST_SECRET, Client, start_ingress, wait_drained
from tests.signing import signed
from tests.support.paths import DATA
from tests.support.samples import SAMPLE
from tests.support.topics import read_all, read_back


def _load(name: str) -> bytes:
    return (DATA / name).read_bytes() if name != "sample" else SAMPLE.read_bytes()


@pytest.mark.parametrize(
    ("fixture", "source_format", "call_id"),
    [
        ("sample", "FLAT", "cc1abf4a-d005-44a8-825f-702334e8d4c8"),
        ("nested-camel.json", "NESTED_CAMEL", "5c4d030f-8f7b-4e0c-9a51-2f3b1f6e9d11"),
        ("nested-snake.json", "NESTED_SNAKE", "7e1f2a3b-0c4d-4e5f-8a9b-1c2d3e4f5a6b"),
    ],
)
async def test_report_read_back_from_topic_equals_input(
    ingress: Client, kafka: KafkaSettings, fixture: str, source_format: str, call_id: str
) -> None:
    body = _load(fixture)
    resp = await ingress.post(WEBHOOK_PATH, data=body, headers=signed(body, TEST_SECRET))
    assert resp.status == 202, await resp.text()
    answer = await resp.json()
    assert answer["callId"] == call_id

    [landed] = await read_back(kafka, kafka.topic, expect=1)
    assert landed.raw.key == call_id.encode()
    current = default_store().current("end_of_call_report")
    assert RecordHeaders.parse(landed.raw.headers) == RecordHeaders(
        event_type="end-of-call-report",
        schema_id=current.fingerprint.hex(),
        wire_format="avro-single-object",
        source_format=source_format,
        request_id=answer["requestId"],
    )
    assert landed.decoded.writer_version == current.version

    report = CallReport.from_record(landed.decoded.record)
    # Lossless: the sender's payload comes back exactly, types included.
    assert orjson.dumps(report.source_payload(), option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        orjson.loads(body), option=orjson.OPT_SORT_KEYS
    )
    assert report.call_id == call_id
    assert report.source_format == source_format
    assert report.request_id == answer["requestId"]


async def test_flat_sample_fields_are_typed_in_the_canonical_record(
    ingress: Client, kafka: KafkaSettings, sample_bytes: bytes
) -> None:
    resp = await ingress.post(
        WEBHOOK_PATH, data=sample_bytes, headers=signed(sample_bytes, TEST_SECRET)
    )
    assert resp.status == 202
    [landed] = await read_back(kafka, kafka.topic, expect=1)
    report = CallReport.from_record(landed.decoded.record)
    assert report.event_time.isoformat() == "2025-08-27T11:40:20.944000+00:00"
    assert report.duration_seconds == 132.5
    assert report.from_number == "+31623731537"
    assert report.to_number == "+31850835003"
    assert report.success_evaluation == "true"  # a string in the sample, kept a string
    assert report.structured_data is not None
    assert report.structured_data["sentiment"] == 9
    assert report.structured_data["vraag_beantwoord"] is True
    assert report.user_metadata == {"candidateId": "cand_123456", "preferredRole": "backend"}
    assert report.extra is None  # every field of the sample has a typed home


async def test_nested_unknown_fields_and_nesting_survive(
    ingress: Client, kafka: KafkaSettings
) -> None:
    body = _load("nested-camel.json")
    resp = await ingress.post(WEBHOOK_PATH, data=body, headers=signed(body, TEST_SECRET))
    assert resp.status == 202
    [landed] = await read_back(kafka, kafka.topic, expect=1)
    report = CallReport.from_record(landed.decoded.record)
    assert report.duration_seconds == 84
    assert isinstance(report.duration_seconds, int)
    assert report.structured_data is not None
    assert report.structured_data["details"] == {"dagen": ["ma", "di"], "score": 7.5, "leeg": None}
    assert report.extra is not None
    assert report.extra["message"]["futureField"] == {"nieuw": [1, 2.5, "drie", False]}
    assert report.assistant_name == "Flireo Demo"
    assert report.ended_reason == "customer-ended-call"


async def test_status_update_goes_to_the_events_topic(
    ingress: Client, kafka: KafkaSettings
) -> None:
    body = _load("status-update.json")
    resp = await ingress.post(WEBHOOK_PATH, data=body, headers=signed(body, TEST_SECRET))
    assert resp.status == 202
    assert (await resp.json())["topic"] == kafka.events_topic
    [landed] = await read_back(kafka, kafka.events_topic, expect=1)
    assert landed.decoded.name == "flireo_event"
    assert landed.decoded.record["call_id"] == "cc1abf4a-d005-44a8-825f-702334e8d4c8"
    assert orjson.loads(landed.decoded.record["body_json"]) == orjson.loads(body)


async def test_gzip_body_is_accepted(
    ingress: Client, kafka: KafkaSettings, sample_bytes: bytes
) -> None:
    wire = gzip.compress(sample_bytes)
    headers = signed(wire, TEST_SECRET) | {"Content-Encoding": "gzip"}
    resp = await ingress.post(WEBHOOK_PATH, data=wire, headers=headers)
    assert resp.status == 202, await resp.text()
    [landed] = await read_back(kafka, kafka.topic, expect=1)
    assert CallReport.from_record(landed.decoded.record).source_payload() == orjson.loads(
        sample_bytes
    )


def _mutated(path: tuple[str, ...], value: Any, *, delete: bool = False) -> bytes:
    payload = orjson.loads(SAMPLE.read_bytes())
    node = payload
    for part in path[:-1]:
        node = node[part]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return orjson.dumps(payload)


_DEPTH_BOMB = b'{"eventType":"end-of-call-report","x":' + b"[" * 200 + b"]" * 200 + b"}"
_GZIP_BOMB = gzip.compress(b'{"a":"' + b"0" * 5_000_000 + b'"}')

BAD_INPUTS: list[tuple[str, bytes, dict[str, str], int, str, str | None]] = [
    ("not json", b"{nope", {}, 400, "invalid-json", None),
    ("invalid utf-8", b'{"eventType":"\xff"}', {}, 400, "invalid-json", None),
    ("NaN literal", b'{"eventType":"end-of-call-report","x":NaN}', {}, 400, "invalid-json", None),
    ("Infinity", b'{"eventType":"end-of-call-report","x":1e999}', {}, 400, "invalid-json", None),
    (
        "huge integer",
        _mutated(("callLengthSeconds",), 0)[:-1] + b',"n":123456789012345678901234567890}',
        {},
        400,
        "invalid-json",
        "/n",
    ),
    ("too deep", _DEPTH_BOMB, {}, 400, "invalid-json", None),
    ("array body", b"[1,2]", {}, 422, "invalid-report", ""),
    ("no format", b'{"hello":"world"}', {}, 422, "invalid-report", ""),
    (
        "missing callId",
        _mutated(("callId",), None, delete=True),
        {},
        422,
        "invalid-report",
        "/callId",
    ),
    ("empty callId", _mutated(("callId",), ""), {}, 422, "invalid-report", "/callId"),
    ("numeric callId", _mutated(("callId",), 42), {}, 422, "invalid-report", "/callId"),
    (
        "string timestamp",
        _mutated(("eventTimestamp",), "yesterday"),
        {},
        422,
        "invalid-report",
        "/eventTimestamp",
    ),
    (
        "boolean duration",
        _mutated(("callLengthSeconds",), True),
        {},
        422,
        "invalid-report",
        "/callLengthSeconds",
    ),
    (
        "negative duration",
        _mutated(("callLengthSeconds",), -3),
        {},
        422,
        "invalid-report",
        "/callLengthSeconds",
    ),
    (
        "structuredData not object",
        _mutated(("analysis", "structuredData"), [1]),
        {},
        422,
        "invalid-report",
        "/analysis/structuredData",
    ),
    (
        "recordings not object",
        _mutated(("recordings",), "x"),
        {},
        422,
        "invalid-report",
        "/recordings",
    ),
    (
        "bad event type",
        _mutated(("eventType",), "DROP TABLE"),
        {},
        422,
        "invalid-report",
        "/eventType",
    ),
    (
        "nested without call id",
        b'{"message":{"type":"end-of-call-report","timestamp":"2025-12-13T12:05:30Z"}}',
        {},
        422,
        "invalid-report",
        "/message/call/id",
    ),
    (
        "nested naive timestamp",
        b'{"message":{"type":"end-of-call-report","timestamp":"2025-12-13T12:05:30","call":{"id":"a"}}}',
        {},
        422,
        "invalid-report",
        "/message/timestamp",
    ),
    (
        "body over the limit",
        b'{"eventType":"' + b"x" * 1_100_000 + b'"}',
        {},
        413,
        "body-too-large",
        None,
    ),
    ("gzip bomb", _GZIP_BOMB, {"Content-Encoding": "gzip"}, 413, "body-too-large", None),
    (
        "gzip header, plain body",
        b'{"eventType":"x"}',
        {"Content-Encoding": "gzip"},
        400,
        "invalid-gzip",
        None,
    ),
    ("brotli", b"xx", {"Content-Encoding": "br"}, 415, "unsupported-encoding", None),
]


async def test_bad_inputs_get_problem_json_and_nothing_is_published(
    ingress: Client, kafka: KafkaSettings, sample_bytes: bytes
) -> None:
    for name, body, extra_headers, status, slug, pointer in BAD_INPUTS:
        headers = signed(body, TEST_SECRET) | extra_headers
        resp = await ingress.post(WEBHOOK_PATH, data=io.BytesIO(body), headers=headers)
        assert resp.status == status, f"{name}: {resp.status} {await resp.text()}"
        assert resp.content_type == "application/problem+json", name
        problem = await resp.json()
        assert problem["type"] == f"urn:callstream:problem:{slug}", name
        assert problem["status"] == status, name
        assert problem["detail"], name
        if pointer is not None:
            assert problem.get("pointer") == pointer, f"{name}: {problem}"
    # The service still serves, and the only record on the topic is this sentinel.
    resp = await ingress.post(
        WEBHOOK_PATH, data=sample_bytes, headers=signed(sample_bytes, TEST_SECRET)
    )
    assert resp.status == 202
    await wait_drained(ingress)
    landed = await read_all(kafka, kafka.topic)
    assert [item.raw.key for item in landed] == [b"cc1abf4a-d005-44a8-825f-702334e8d4c8"]
    assert await read_back(kafka, kafka.events_topic, idle=1.0) == []


async def test_unknown_paths_and_methods_are_problem_json(ingress: Client) -> None:
    resp = await ingress.get(WEBHOOK_PATH)
    assert resp.status == 405
    assert resp.content_type == "application/problem+json"
    resp = await ingress.post("/nope", data=b"{}")
    assert resp.status == 404
    assert resp.content_type == "application/problem+json"


async def test_health_ready_and_metrics(ingress: Client, sample_bytes: bytes) -> None:
    assert (await ingress.get("/healthz")).status == 200
    deadline = time.monotonic() + 30
    while (await ingress.get("/readyz")).status != 200:
        assert time.monotonic() < deadline, "ingress never became ready"
        await __import__("asyncio").sleep(0.2)
    await ingress.post(WEBHOOK_PATH, data=sample_bytes, headers=signed(sample_bytes, TEST_SECRET))
    await ingress.post(WEBHOOK_PATH, data=b"{", headers=signed(b"{", TEST_SECRET))
    text = await (await ingress.get("/metrics")).text()
    assert 'callstream_ingress_requests_total{outcome="accepted"} 1.0' in text
    assert 'callstream_ingress_requests_total{outcome="invalid-json"} 1.0' in text
    assert "callstream_ingress_request_duration_seconds_count 2.0" in text
    assert "callstream_ingress_publish_duration_seconds_count 1.0" in text
    # The report, and the refused body kept on the quarantine topic.
    assert "callstream_ingress_kafka_ack_duration_seconds_count 2.0" in text
    assert f"callstream_ingress_received_bytes_total {float(len(sample_bytes) + 1)}" in text
    assert re.search(r"^callstream_python_heap_blocks [1-9][0-9.e+]*$", text, re.MULTILINE)


async def test_gzip_with_several_members_is_inflated_whole(
    ingress: Client, kafka: KafkaSettings, sample_bytes: bytes
) -> None:
    half = len(sample_bytes) // 2
    wire = gzip.compress(sample_bytes[:half]) + gzip.compress(sample_bytes[half:])
    headers = signed(wire, TEST_SECRET) | {"Content-Encoding": "gzip"}
    resp = await ingress.post(WEBHOOK_PATH, data=wire, headers=headers)
    assert resp.status == 202, await resp.text()
    garbage = gzip.compress(sample_bytes) + b"trailing"
    headers = signed(garbage, TEST_SECRET) | {"Content-Encoding": "gzip"}
    resp = await ingress.post(WEBHOOK_PATH, data=garbage, headers=headers)
    assert resp.status == 400
    assert (await resp.json())["type"] == "urn:callstream:problem:invalid-gzip"
    await wait_drained(ingress)
    assert len(await read_all(kafka, kafka.topic)) == 1


async def test_lower_case_rfc3339_timestamp_is_accepted_and_kept_as_sent(
    ingress: Client, kafka: KafkaSettings
) -> None:
    payload = orjson.loads(_load("nested-camel.json"))
    payload["message"]["timestamp"] = "2025-12-13t12:05:30.250z"
    body = orjson.dumps(payload)
    resp = await ingress.post(WEBHOOK_PATH, data=body, headers=signed(body, TEST_SECRET))
    assert resp.status == 202, await resp.text()
    [landed] = await read_back(kafka, kafka.topic, expect=1)
    report = CallReport.from_record(landed.decoded.record)
    assert report.event_time.isoformat() == "2025-12-13T12:05:30.250000+00:00"
    assert report.source_payload() == payload


async def test_report_over_kafkas_record_limit_is_413_not_retry(
    ingress_settings: IngressSettings, kafka: KafkaSettings
) -> None:
    settings = dataclasses.replace(ingress_settings, max_body_bytes=3_000_000)
    client = await start_ingress(settings)
    try:
        body = orjson.dumps(_sample_with(transcriptText="AI: hallo\n" * 200_000))
        resp = await client.post(
            WEBHOOK_PATH, data=io.BytesIO(body), headers=signed(body, TEST_SECRET)
        )
        assert resp.status == 413, await resp.text()
        assert "limit" in (await resp.json())["detail"]
    finally:
        await client.close()
    assert await read_back(kafka, kafka.topic, idle=1.0) == []


def _sample_with(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = orjson.loads(SAMPLE.read_bytes())
    payload.update(changes)
    return payload


async def test_sender_hanging_up_mid_body_is_not_an_internal_error(
    ingress_settings: IngressSettings,
) -> None:
    # The production runner (no handler cancellation), not the test client's.
    runner = IngressRunner(create_app(ingress_settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        # Signed (over bytes never sent in full): an unsigned one is refused before its body.
        credentials = "".join(f"{k}: {v}\r\n" for k, v in signed(b"", TEST_SECRET).items())
        writer.write(
            f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: x\r\n{credentials}".encode()
            + b"Content-Length: 500\r\n\r\n"
            + b'{"eventType": "end-of-call'
        )
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        text = ""
        async with aiohttp.ClientSession() as session:
            for _ in range(50):
                async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    text = await resp.text()
                if 'outcome="body-incomplete"} 1.0' in text:
                    break
                await asyncio.sleep(0.1)
    finally:
        await runner.cleanup()
    assert 'callstream_ingress_requests_total{outcome="body-incomplete"} 1.0' in text
    assert 'callstream_ingress_requests_total{outcome="internal-error"} 0.0' in text
