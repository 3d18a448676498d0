"""`callstream trace` against the real broker and real storage: a call the whole pipeline
handled (then erased), one still in the ingress's spool, one a consumer dead-lettered, and one
nobody has seen."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from callstream.consumerstatus import KafkaInspector, default_group_id
from callstream.ports import free_port
from callstream.trace import key_partition
from consumers.storage import build
from core.kafkasettings import KafkaSettings
from core.secret import Secret
from core.settings import to_env
from core.signing import WEBHOOK_PATH
from ingress.settings import IngressSettings
from tests.conftest import TEST_SECRET, start_ingress, wait_drained
from tests.integration.test_dlq import Fussy
from tests.signing import signed
from tests.support.cli import run_cli
from tests.support.paths import DATA
from tests.support.pipeline import Pipeline, Receivers, ingress_ready, until
from tests.support.produce import produce_reports, sample_report
from tests.support.runner import eventually, running


def _env(kafka: KafkaSettings, tmp_path: Path, **extra: str) -> dict[str, str]:
    """A user's shell pointed at the test's topics, with no storage, alert state or spool
    unless the test names them."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSTREAM_", "KAFKA_"))}
    return (
        base
        | to_env(kafka)
        | {
            "CALLSTREAM_LOG_LEVEL": "WARNING",
            "CALLSTREAM_SQLITE_PATH": str(tmp_path / "no-storage.db"),
            "CALLSTREAM_ALERT_STATE_PATH": str(tmp_path / "no-alerts.db"),
            "CALLSTREAM_SPOOL_DIR": str(tmp_path / "no-spool"),
        }
        | extra
    )


async def trace(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    done = await asyncio.to_thread(run_cli, "trace", *args, "--json", env=env)
    assert done.returncode in (0, 1), done.stderr
    [line] = done.stdout.splitlines()
    doc: dict[str, Any] = orjson.loads(line)
    return done.returncode, doc


def _send(pipeline: Pipeline, tmp_path: Path, name: str, payload: dict[str, Any]) -> None:
    path = tmp_path / name
    path.write_bytes(orjson.dumps(payload))
    done = run_cli("send", str(path), env=pipeline.env)
    assert done.returncode == 0, done.stdout + done.stderr


def _all_handled(doc: dict[str, Any]) -> bool:
    reports = [v for v in doc["versions"] if v["event_type"] == "end-of-call-report"]
    return bool(reports) and all(
        g["state"] == "handled" for v in reports for g in v["groups"].values()
    )


@pytest.mark.slow
async def test_trace_of_a_stored_call_fills_every_section_and_shows_its_erasure(
    pipeline: Pipeline, receivers: Receivers, kafka: KafkaSettings, tmp_path: Path
) -> None:
    await ingress_ready(pipeline)
    call_id = str(uuid.uuid4())
    _send(pipeline, tmp_path, "report.json", sample_report(call_id))
    status: dict[str, Any] = orjson.loads(
        (DATA / "payloads/flireo-flat-status-update.json").read_bytes()
    )
    status |= {"callSession": call_id, "eventTimestamp": int(time.time() * 1000)}
    _send(pipeline, tmp_path, "status.json", status)

    def stored(table: str) -> bool:
        with sqlite3.connect(pipeline.db) as conn:
            found = conn.execute(f"select 1 from {table} where call_id = ?", (call_id,))  # noqa: S608
            return bool(found.fetchall())

    async def report_stored() -> bool:
        return stored("call_reports")

    async def timeline_stored() -> bool:
        return stored("call_events")

    async def alerted() -> bool:
        return len(receivers.hooks) == 1 and len(receivers.mailbox.messages) == 1

    # Generous: the whole pipeline starts in this test, on a machine that may be busy.
    await until(report_stored, timeout=240, what="the report stored")
    await until(timeline_stored, timeout=120, what="its status update stored")
    await until(alerted, timeout=120, what="both alerts sent")
    env = pipeline.env | {"CALLSTREAM_LOG_LEVEL": "WARNING"}
    docs: list[dict[str, Any]] = []

    async def traced_everywhere() -> bool:
        docs.append((await trace(env, call_id))[1])
        return _all_handled(docs[-1])

    await until(traced_everywhere, timeout=180, what="every consumer group past the report")
    doc = docs[-1]
    assert doc["found"] is True
    async with KafkaInspector(kafka) as look:
        expected = key_partition(call_id.encode(), await look.partitions(kafka.topic))
    [report] = [v for v in doc["versions"] if v["topic"] == kafka.topic]
    [update] = [v for v in doc["versions"] if v["topic"] == kafka.events_topic]
    assert report["partition"] == expected
    assert report["event_type"] == "end-of-call-report"
    assert report["source_format"] == "FLAT"
    assert set(report["groups"]) == {"storage", "alerting", "metrics"}
    assert update["event_type"] == "status-update"
    # Only the call's partition of each topic was read, and the output says which offsets.
    windows = doc["lookback"]["windows"]
    assert {(w["topic"], w["partition"]) for w in windows} >= {(kafka.topic, expected)}
    assert len([w for w in windows if w["topic"] == kafka.topic]) == 1
    assert {r["request_id"] for r in doc["receptions"]} == {
        report["request_id"],
        update["request_id"],
    }
    assert all(r["durable"] == "kafka" for r in doc["receptions"])
    row = doc["storage"]["row"]
    assert row["request_id"] == report["request_id"]
    assert (row["kafka_partition"], row["kafka_offset"]) == (report["partition"], report["offset"])
    assert row["stored_at"] is not None
    [event] = doc["timeline"]["events"]
    assert event["status"] == "in-progress"
    assert {(a["rule"], a["channel"], a["status"]) for a in doc["alerts"]["alerts"]} == {
        ("happy-caller", "hook", "sent"),
        ("happy-caller", "mail", "sent"),
    }
    assert doc["dead_letters"]["entries"] == []
    assert doc["erasures"]["entries"] == []
    assert doc["spool"]["available"] is True
    assert doc["spool"]["entries"] == []
    # No phone number or transcript in what an operator pastes into a ticket.
    assert "+3162373" not in orjson.dumps(doc).decode()
    assert "Goedemiddag" not in orjson.dumps(doc).decode()

    screen = await asyncio.to_thread(run_cli, "trace", call_id, env=env)
    assert screen.returncode == 0, screen.stderr
    assert f"call {call_id}" in screen.stdout
    assert "happy-caller -> hook: sent" in screen.stdout
    assert "storage handled" in screen.stdout
    assert "looked back: the last 10000 record(s) per partition" in screen.stdout

    # By the request id the sender got back: every partition's window is read to find it.
    code, by_request = await trace(env, "--request-id", update["request_id"])
    assert code == 0
    assert by_request["call_id"] == call_id
    assert by_request["versions"] == doc["versions"]
    looked_at = {(w["topic"], w["partition"]) for w in by_request["lookback"]["windows"]}
    async with KafkaInspector(kafka) as look:
        every = {(kafka.topic, p) for p in await look.partitions(kafka.topic)}
    assert looked_at >= every

    erased = await asyncio.to_thread(run_cli, "erase", "--call", call_id, env=env)
    assert erased.returncode == 0, erased.stderr
    code, after = await trace(env, call_id)
    assert code == 0  # Kafka still holds the call until its retention
    assert after["storage"]["row"] is None
    assert after["timeline"]["events"] == []
    [erasure] = after["erasures"]["entries"]
    assert erasure["by"] == "call id"
    assert erasure["kind"] == "call"
    assert erasure["rows_deleted"] >= 1
    assert erasure["completed_at"] is not None
    # An erasure by the caller's number covers the call too: matched by hash, never shown.
    number = sample_report()["fromCaller"]
    by_phone = await asyncio.to_thread(run_cli, "erase", "--phone", number, env=env)
    assert by_phone.returncode == 0, by_phone.stderr
    _, again = await trace(env, call_id)
    assert [e["by"] for e in again["erasures"]["entries"]] == ["call id", "caller's number"]
    assert number not in orjson.dumps(again).decode()


async def test_trace_of_a_report_in_the_spool_and_once_it_drained(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    # The ingress's Kafka does not answer: the report is made durable in the spool.
    away = KafkaSettings(
        f"127.0.0.1:{free_port()}", topic=kafka.topic, events_topic=kafka.events_topic
    )
    settings = IngressSettings(
        kafka=away,
        host="127.0.0.1",
        port=0,
        webhook_secrets=(Secret(TEST_SECRET),),
        kafka_ack_deadline_seconds=0.5,
        spool_dir=spool,
    )
    call_id, request_id = str(uuid.uuid4()), f"req-{uuid.uuid4().hex[:8]}"
    body = orjson.dumps(sample_report(call_id))
    client = await start_ingress(settings)
    try:
        resp = await client.post(
            WEBHOOK_PATH,
            data=body,
            headers=signed(body, TEST_SECRET) | {"X-Request-Id": request_id},
        )
        answer = await resp.json()
        assert resp.status == 202, answer
        assert answer["durable"] == "spool"
        env = _env(
            kafka,
            tmp_path,
            CALLSTREAM_SPOOL_DIR=str(spool),
            CALLSTREAM_KAFKA_ACK_DEADLINE_SECONDS="0.5",
        )
        # Read while the ingress holds the spool: trace takes no lock and changes nothing.
        code, doc = await trace(env, call_id)
    finally:
        await client.close()
    assert code == 0
    assert doc["found"] is True
    [reception] = doc["receptions"]
    assert reception["durable"] == "spool"
    assert reception["request_id"] == request_id
    assert reception["source_format"] == "FLAT"
    [entry] = doc["spool"]["entries"]
    assert entry["topic"] == kafka.topic
    assert doc["versions"] == []
    assert sorted(doc["lookback"]["missing_topics"]) == sorted(
        [kafka.topic, kafka.events_topic, kafka.dlq_topic]
    )

    code, by_request = await trace(env, "--request-id", request_id)
    assert code == 0
    assert by_request["call_id"] == call_id
    assert by_request["spool"]["entries"] == doc["spool"]["entries"]

    # Kafka is back: the ingress drains its spool at start, and the trace tells the report
    # reached Kafka through it (later than the ingress waits for Kafka's acknowledgement).
    client = await start_ingress(replace(settings, kafka=kafka))
    try:
        await wait_drained(client)
    finally:
        await client.close()
    code, drained = await trace(env, call_id)
    assert code == 0
    assert drained["spool"]["entries"] == []
    [version] = drained["versions"]
    assert version["request_id"] == request_id
    [reception] = drained["receptions"]
    assert reception["durable"] == "kafka"
    assert reception["through_spool"] is True
    assert reception["request_id"] == request_id


async def test_trace_of_a_dead_lettered_call(kafka: KafkaSettings, tmp_path: Path) -> None:
    kept, refused = await produce_reports(kafka, [sample_report(), sample_report()])
    fussy = Fussy({refused})
    async with running(fussy, kafka, f"g-fussy-{uuid.uuid4().hex[:8]}"):
        await eventually(lambda: fussy.seen == [kept], timeout=60)
        env = _env(kafka, tmp_path)

        async def dead_lettered() -> bool:
            return bool((await trace(env, refused))[1]["dead_letters"]["entries"])

        await until(dead_lettered, timeout=90, what="the refused call on the dead-letter topic")
    code, doc = await trace(env, refused)
    assert code == 0
    [letter] = doc["dead_letters"]["entries"]
    assert letter["consumer"] == "fussy"
    assert letter["error_type"] == "PermanentError"
    assert letter["key"] == refused
    assert letter["redriven"] is False
    [version] = doc["versions"]
    assert (letter["origin"]["partition"], letter["origin"]["offset"]) == (
        version["partition"],
        version["offset"],
    )
    # Sources that are not configured say so instead of failing the trace.
    assert doc["storage"]["available"] is False
    assert "no-storage.db" in doc["storage"]["note"]
    assert doc["alerts"]["available"] is False
    assert doc["spool"]["available"] is False
    code, other = await trace(env, kept)
    assert other["dead_letters"]["entries"] == []


async def test_trace_of_a_call_never_seen_is_empty_json_and_exit_code_1(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    await produce_reports(kafka, [sample_report()])
    env = _env(kafka, tmp_path)
    code, doc = await trace(env, "never-seen-call")
    assert code == 1
    assert doc["found"] is False
    assert doc["versions"] == []
    assert doc["receptions"] == []
    [window] = [w for w in doc["lookback"]["windows"] if w["topic"] == kafka.topic]
    assert window["whole_partition"] is True

    code, by_request = await trace(env, "--request-id", "no-such-request")
    assert code == 1
    assert by_request["call_id"] is None
    assert by_request["found"] is False

    screen = await asyncio.to_thread(run_cli, "trace", "never-seen-call", env=env)
    assert screen.returncode == 1
    assert "nothing names this call" in screen.stdout


async def test_trace_reads_storage_and_erasures_on_each_database(
    kafka: KafkaSettings, storage_env: dict[str, str], tmp_path: Path
) -> None:
    """The storage consumer in its registered group through the real runner, on SQLite and
    PostgreSQL: trace finds the row, sees the group past the record, and after an erasure
    finds the log entry and no row, through connections that migrate nothing."""
    [call_id] = await produce_reports(kafka, [sample_report()])
    env = _env(kafka, tmp_path) | storage_env
    storage = build(storage_env, CollectorRegistry())
    async with running(storage, kafka, default_group_id("storage")):

        async def handled() -> bool:
            doc = (await trace(env, call_id))[1]
            return bool(doc["storage"].get("row")) and all(
                v["groups"]["storage"]["state"] == "handled" for v in doc["versions"]
            )

        await until(handled, timeout=120, what="the report stored and its offset committed")
    code, doc = await trace(env, call_id)
    assert code == 0
    [version] = doc["versions"]
    row = doc["storage"]["row"]
    assert (row["kafka_partition"], row["kafka_offset"]) == (
        version["partition"],
        version["offset"],
    )
    assert doc["erasures"] == {"available": True, "entries": []}
    assert doc["timeline"] == {"available": True, "events": []}
    erased = await asyncio.to_thread(run_cli, "erase", "--call", call_id, env=env)
    assert erased.returncode == 0, erased.stderr
    code, after = await trace(env, call_id)
    assert code == 0
    assert after["storage"]["row"] is None
    [erasure] = after["erasures"]["entries"]
    assert (erasure["kind"], erasure["by"], erasure["rows_deleted"]) == ("call", "call id", 1)


async def test_trace_of_a_quarantined_call_names_its_refused_request(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    settings = IngressSettings(
        kafka=kafka, host="127.0.0.1", port=0, webhook_secrets=(Secret(TEST_SECRET),)
    )
    call_id, request_id = str(uuid.uuid4()), f"req-{uuid.uuid4().hex[:8]}"
    # A duration that is not a number: refused with a 422, and kept because it is signed.
    body = orjson.dumps(sample_report(call_id) | {"callLengthSeconds": "long"})
    client = await start_ingress(settings)
    try:
        resp = await client.post(
            WEBHOOK_PATH,
            data=body,
            headers=signed(body, TEST_SECRET) | {"X-Request-Id": request_id},
        )
        assert resp.status == 422, await resp.text()
        assert resp.headers["X-Callstream-Quarantined"] == "kafka"
    finally:
        await client.close()
    env = _env(kafka, tmp_path)
    code, doc = await trace(env, call_id)
    assert code == 0
    assert doc["versions"] == []
    [entry] = doc["quarantine"]["entries"]
    assert entry["request_id"] == request_id
    assert entry["state"] == "QUARANTINED"
    assert entry["status"] == 422
    screen = await asyncio.to_thread(run_cli, "trace", call_id, env=env)
    assert f"request {request_id}: QUARANTINED" in screen.stdout
