"""`callstream rejected` and `callstream erase` over a real quarantine: requests refused by a
real ingress, read back, reprocessed and erased on the real broker."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from callstream.consumerstatus import KafkaInspector, TopicMissingError
from callstream.rejected import load, reprocess
from core.kafkasettings import KafkaSettings
from core.settings import to_env
from core.signing import WEBHOOK_PATH
from core.topicreader import read_range
from ingress.quarantine import QUARANTINE_HEADER
from ingress.settings import IngressSettings
from schemas.errors import InvalidReport
from schemas.normalise import Normalised, normalise
from schemas.report import CallReport
from tests.conftest import TEST_SECRET, Client, start_ingress, wait_drained
from tests.signing import signed
from tests.support.cli import run_cli
from tests.support.paths import DATA
from tests.support.produce import sample_report
from tests.support.topics import read_all

ALICE = "+31600000101"
BOB = "+31600000202"
NO_CALL_ID = orjson.dumps(
    {"message": {"type": "end-of-call-report", "durationSeconds": 12, "summary": "probe"}}
)


def _env(kafka: KafkaSettings, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSTREAM_", "KAFKA_"))}
    return base | to_env(kafka) | extra


async def _cli(kafka: KafkaSettings, *args: str, **extra: str) -> tuple[int, str, str]:
    done = await asyncio.to_thread(run_cli, *args, env=_env(kafka, **extra))
    return done.returncode, done.stdout, done.stderr


async def _refuse(ingress: Client, body: bytes, status: int) -> str:
    resp = await ingress.post(WEBHOOK_PATH, data=body, headers=signed(body, TEST_SECRET))
    assert resp.status == status, await resp.text()
    # Kept, maybe in the spool first (a new topic on a cluster still electing leaders): the
    # commands read Kafka, so wait until it is there.
    assert resp.headers[QUARANTINE_HEADER] in {"kafka", "spool"}
    await wait_drained(ingress)
    return resp.headers["X-Request-Id"]


def _lines(stdout: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stdout.splitlines()]


async def test_list_is_json_lines_filtered_by_reason_and_time(
    ingress: Client, kafka: KafkaSettings
) -> None:
    code, out, err = await _cli(kafka, "rejected", "list", "--json")
    assert (code, out) == (0, ""), err  # nothing kept yet, the topic may not even exist

    no_call = await _refuse(ingress, NO_CALL_ID, 422)
    broken = await _refuse(ingress, b'{"callId": ', 400)

    code, out, err = await _cli(kafka, "rejected", "list", "--json")
    assert code == 0, err
    listed = _lines(out)
    assert [e["requestId"] for e in listed] == [no_call, broken]
    assert listed[0]["problem"] == "invalid-report"
    assert listed[0]["pointer"] == "/message/call/id"
    assert listed[0]["state"] == "QUARANTINED"
    assert listed[1]["bodySize"] == len(b'{"callId": ')

    code, out, _ = await _cli(kafka, "rejected", "list", "--json", "--reason", "invalid-json")
    assert [e["requestId"] for e in _lines(out)] == [broken]
    code, out, _ = await _cli(kafka, "rejected", "list", "--json", "--since", "2999-01-01")
    assert (code, out) == (0, "")
    code, out, _ = await _cli(kafka, "rejected", "list", "--since", listed[1]["receivedAt"])
    assert out.startswith("1 kept request(s) on ")
    assert broken in out
    assert no_call not in out


async def test_show_prints_the_kept_body_and_headers(ingress: Client, kafka: KafkaSettings) -> None:
    request_id = await _refuse(ingress, NO_CALL_ID, 422)
    code, out, err = await _cli(kafka, "rejected", "show", request_id)
    assert code == 0, err
    shown = orjson.loads(out)
    assert shown["requestId"] == request_id
    assert shown["body"] == NO_CALL_ID.decode()
    assert shown["headers"]["x-webhook-signature"] == "[redacted]"
    assert shown["headers"]["content-type"] == "application/json"

    code, _, err = await _cli(kafka, "rejected", "show", "no-such-request")
    assert code == 1
    assert "no kept request no-such-request" in err


def _keyed_by_request_id(payload: Any, *, received_at_ms: int, request_id: str) -> Normalised:
    """A normaliser as it might change: a report with no call id is keyed by its request id
    instead of being refused."""
    try:
        return normalise(payload, received_at_ms=received_at_ms, request_id=request_id)
    except InvalidReport as exc:
        if exc.pointer != "/message/call/id":
            raise
        payload["message"]["call"] = {"id": f"request-{request_id}"}
        return normalise(payload, received_at_ms=received_at_ms, request_id=request_id)


async def test_reprocess_publishes_once_what_a_changed_normaliser_passes(
    ingress: Client, kafka: KafkaSettings
) -> None:
    request_id = await _refuse(ingress, NO_CALL_ID, 422)
    broken = await _refuse(ingress, b"[1, 2", 400)

    # Today's normaliser still refuses both: nothing is sent.
    code, out, err = await _cli(kafka, "rejected", "reprocess", "--dry-run")
    assert code == 0, err
    assert f"{request_id}: still refused: is required at /message/call/id" in out
    assert out.endswith("dry run: 0 would be published, 2 still refused\n")

    received_at_ms = (await load(kafka))[request_id].received_at_ms
    outcomes = await reprocess(kafka, normaliser=_keyed_by_request_id)
    assert [(o.request_id, o.verdict) for o in outcomes] == [
        (request_id, "published"),
        (broken, "still-refused"),
    ]
    [landed] = await read_all(kafka, kafka.topic)
    report = CallReport.from_record(landed.decoded.record)
    assert landed.raw.key == f"request-{request_id}".encode()
    assert report.request_id == request_id
    # The original receive time, not the reprocess time: the report has no timestamp of its own.
    assert int(report.event_time.timestamp() * 1000) == received_at_ms
    assert report.summary == "probe"

    again = await reprocess(kafka, normaliser=_keyed_by_request_id)
    assert [(o.request_id, o.verdict) for o in again] == [(broken, "still-refused")]
    assert len(await read_all(kafka, kafka.topic)) == 1
    code, out, _ = await _cli(kafka, "rejected", "list", "--json")
    states = {e["requestId"]: (e["state"], e["reprocessedTo"]) for e in _lines(out)}
    assert states == {request_id: ("REPROCESSED", kafka.topic), broken: ("QUARANTINED", None)}


# Typed with spaces around it, the number still matches: storage strips it, and so must this.
@pytest.mark.parametrize("typed", [ALICE, f" {ALICE}\t"], ids=["exact", "with-spaces"])
async def test_erase_removes_the_matching_quarantine_entries(
    ingress: Client, kafka: KafkaSettings, tmp_path: Path, typed: str
) -> None:
    # Refused for a wrong type: the kept bodies hold the callers' numbers.
    alices = orjson.dumps(sample_report(fromCaller=ALICE, callLengthSeconds="long"))
    bobs = orjson.dumps(sample_report(fromCaller=BOB, callLengthSeconds="long"))
    await _refuse(ingress, alices, 422)
    bob = await _refuse(ingress, bobs, 422)

    code, out, err = await _cli(
        kafka, "erase", "--phone", typed, CALLSTREAM_SQLITE_PATH=str(tmp_path / "c.db")
    )
    assert code == 0, err
    assert f"erased 1 quarantined request(s) from {kafka.rejected_topic}" in out
    assert ALICE not in out + err

    code, out, _ = await _cli(kafka, "rejected", "list", "--json")
    assert [e["requestId"] for e in _lines(out)] == [bob]
    # Alice's entry ends in a tombstone: compaction then removes the body for good.
    last: dict[bytes, bytes | None] = {}
    async with KafkaInspector(kafka) as look:
        topic = kafka.rejected_topic
        start, end = await look.log_offsets(topic, await look.partitions(topic))
    async for raw in read_range(kafka, topic, start, end):
        assert raw.key is not None
        last[raw.key] = raw.value
    assert [key for key, value in last.items() if value is None] == [
        key for key in last if key != bob.encode()
    ]


async def test_reprocess_publishes_once_a_report_refused_under_a_setting_since_raised(
    ingress_settings: IngressSettings, kafka: KafkaSettings
) -> None:
    """A real normaliser change: the ingress refused a report for nesting deeper than its
    CALLSTREAM_MAX_JSON_DEPTH; with the setting raised, reprocess publishes it, once."""
    body = (DATA / "payloads" / "flireo-nested-camel-end-of-call.json").read_bytes()
    client = await start_ingress(replace(ingress_settings, max_json_depth=2))
    try:
        request_id = await _refuse(client, body, 400)
    finally:
        await client.close()

    code, out, err = await _cli(kafka, "rejected", "reprocess", CALLSTREAM_MAX_JSON_DEPTH="2")
    assert code == 0, err
    assert f"{request_id}: still refused: nesting deeper than 2 levels" in out
    assert out.endswith("0 published, 1 still refused\n")
    assert await _records(kafka, kafka.topic) == []

    code, out, err = await _cli(kafka, "rejected", "reprocess", "--request-id", request_id)
    assert code == 0, err
    call_id = orjson.loads(body)["message"]["call"]["id"]
    assert f"{request_id}: published to {kafka.topic} (call {call_id})" in out
    [landed] = await read_all(kafka, kafka.topic)
    assert landed.raw.key == call_id.encode()
    assert CallReport.from_record(landed.decoded.record).request_id == request_id
    assert ("reprocessed-from", b"quarantine") in landed.raw.headers

    code, out, err = await _cli(kafka, "rejected", "reprocess")
    assert (code, out) == (0, "0 published, 0 still refused\n"), err
    assert len(await read_all(kafka, kafka.topic)) == 1


async def _records(kafka: KafkaSettings, topic: str) -> list[object]:
    try:
        return list(await read_all(kafka, topic))
    except TopicMissingError:
        return []
