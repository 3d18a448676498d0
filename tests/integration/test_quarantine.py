"""The quarantine on the real broker: every refused authenticated request is kept on
<topic>.rejected before its 4xx, an unauthenticated one is not, and every refusal is logged
once without personal data."""

from __future__ import annotations

import gzip
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from callstream.ports import free_port
from core.kafkasettings import KafkaSettings
from core.signing import SIGNATURE_HEADER, WEBHOOK_PATH
from ingress.quarantine import QUARANTINE_HEADER, REDACTED
from ingress.settings import IngressSettings
from schemas.rejected import RejectedRequest
from tests.conftest import TEST_SECRET, Client, start_ingress, wait_drained
from tests.signing import signed
from tests.support.samples import SAMPLE
from tests.support.topics import read_all

NO_CALL_ID = orjson.dumps(
    {"message": {"type": "end-of-call-report", "duration_seconds": 12, "summary": "probe"}}
)


def _flat(**changes: object) -> bytes:
    payload = orjson.loads(SAMPLE.read_bytes())
    payload.update(changes)
    return orjson.dumps(payload)


async def _kept(kafka: KafkaSettings) -> list[RejectedRequest]:
    return [
        RejectedRequest.from_record(landed.decoded.record)
        for landed in await read_all(kafka, kafka.rejected_topic)
    ]


@pytest.mark.parametrize(
    ("body", "encoding", "status", "slug", "pointer"),
    [
        pytest.param(b'{"eventType": "end-of-call', None, 400, "invalid-json", None, id="parse"),
        pytest.param(
            b'{"callId": "a", "callId": "b"}',
            None,
            400,
            "invalid-json",
            "/callId",
            id="duplicate-key",
        ),
        pytest.param(NO_CALL_ID, None, 422, "invalid-report", "/message/call/id", id="no-call-id"),
        pytest.param(
            _flat(callLengthSeconds="long"),
            None,
            422,
            "invalid-report",
            "/callLengthSeconds",
            id="wrong-type",
        ),
        pytest.param(
            gzip.compress(b" " * 3_000_000), "gzip", 413, "body-too-large", None, id="gzip-bomb"
        ),
        pytest.param(_flat(), "br", 415, "unsupported-encoding", None, id="unknown-encoding"),
    ],
)
async def test_every_refusal_of_an_authenticated_request_is_kept(
    ingress: Client,
    kafka: KafkaSettings,
    body: bytes,
    encoding: str | None,
    status: int,
    slug: str,
    pointer: str | None,
) -> None:
    headers = signed(body, TEST_SECRET) | ({"Content-Encoding": encoding} if encoding else {})
    resp = await ingress.post(WEBHOOK_PATH, data=body, headers=headers)
    assert resp.status == status, await resp.text()
    # Kafka, or the spool while a just-created topic elects its leaders on a loaded machine.
    assert resp.headers[QUARANTINE_HEADER] in {"kafka", "spool"}
    await wait_drained(ingress)
    problem = await resp.json(content_type=None)
    assert problem["type"] == f"urn:callstream:problem:{slug}"

    [entry] = await _kept(kafka)
    assert entry.request_id == resp.headers["X-Request-Id"] == problem["requestId"]
    assert entry.state == "QUARANTINED"
    assert (entry.status, entry.problem, entry.detail) == (status, slug, problem["detail"])
    assert entry.pointer == pointer
    # The bytes exactly as sent, gzip still gzip, so a reprocess sees what the sender sent.
    assert entry.body == body
    assert (entry.body_size, entry.body_truncated) == (len(body), False)
    assert entry.authenticated_by == "signature"
    assert entry.headers[SIGNATURE_HEADER.lower()] == REDACTED
    assert entry.headers.get("content-encoding") == encoding


async def test_an_unauthenticated_request_is_only_counted(
    ingress: Client, kafka: KafkaSettings
) -> None:
    forged = signed(NO_CALL_ID, "not-the-secret")
    refused = await ingress.post(WEBHOOK_PATH, data=NO_CALL_ID, headers=forged)
    assert refused.status == 401
    assert QUARANTINE_HEADER not in refused.headers
    kept = await ingress.post(
        WEBHOOK_PATH, data=NO_CALL_ID, headers=signed(NO_CALL_ID, TEST_SECRET)
    )
    assert kept.status == 422

    # Both were answered in order: only the authenticated one is on the topic.
    await wait_drained(ingress)
    assert [e.request_id for e in await _kept(kafka)] == [kept.headers["X-Request-Id"]]
    metrics = await (await ingress.get("/metrics")).text()
    assert 'callstream_ingress_quarantined_total{reason="invalid-report"} 1.0' in metrics
    assert 'callstream_ingress_requests_total{outcome="unauthorized"} 1.0' in metrics


async def test_with_no_authentication_configured_every_refusal_is_kept(
    ingress_settings: IngressSettings, kafka: KafkaSettings
) -> None:
    client = await start_ingress(replace(ingress_settings, webhook_secrets=()))
    try:
        resp = await client.post(WEBHOOK_PATH, data=NO_CALL_ID)
        assert resp.status == 422
        await wait_drained(client)
    finally:
        await client.close()
    [entry] = await _kept(kafka)
    assert entry.authenticated_by == "none"
    assert entry.body == NO_CALL_ID


async def test_a_refusal_while_kafka_is_away_is_spooled_then_reaches_the_rejected_topic(
    ingress_settings: IngressSettings, kafka: KafkaSettings, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    away = replace(kafka, bootstrap_servers=f"127.0.0.1:{free_port()}")
    client = await start_ingress(
        replace(ingress_settings, kafka=away, spool_dir=spool, kafka_ack_deadline_seconds=0.5)
    )
    try:
        resp = await client.post(
            WEBHOOK_PATH, data=NO_CALL_ID, headers=signed(NO_CALL_ID, TEST_SECRET)
        )
        assert resp.status == 422
        assert resp.headers[QUARANTINE_HEADER] == "spool"
    finally:
        await client.close()

    client = await start_ingress(replace(ingress_settings, spool_dir=spool))
    try:
        await wait_drained(client)
    finally:
        await client.close()
    [entry] = await _kept(kafka)
    assert entry.request_id == resp.headers["X-Request-Id"]
    assert entry.body == NO_CALL_ID


async def test_a_refusal_that_cannot_be_kept_is_answered_503_not_4xx(
    ingress_settings: IngressSettings, kafka: KafkaSettings, tmp_path: Path
) -> None:
    away = replace(kafka, bootstrap_servers=f"127.0.0.1:{free_port()}")
    client = await start_ingress(
        replace(
            ingress_settings,
            kafka=away,
            spool_dir=tmp_path / "spool",
            spool_max_bytes=64 * 1024,
            kafka_ack_deadline_seconds=0.5,
        )
    )
    # Broken JSON big enough that the second copy no longer fits in the spool.
    body = b'{"summary": "' + b"x" * 40_000
    try:
        first = await client.post(WEBHOOK_PATH, data=body, headers=signed(body, TEST_SECRET))
        assert first.status == 400
        assert first.headers[QUARANTINE_HEADER] == "spool"
        second = await client.post(WEBHOOK_PATH, data=body, headers=signed(body, TEST_SECRET))
        assert second.status == 503
        assert int(second.headers["Retry-After"]) > 0
        assert QUARANTINE_HEADER not in second.headers
        problem = await second.json(content_type=None)
        assert "could not be kept" in problem["detail"]
        assert "invalid-json" in problem["detail"]
    finally:
        await client.close()


async def test_every_refusal_is_logged_once_without_personal_data(
    ingress: Client, caplog: pytest.LogCaptureFixture
) -> None:
    phone = "+31612345678"
    # A detail that would quote a phone number (a duplicated key spelled as one), and a body
    # full of personal data: neither reaches the log.
    body = orjson.dumps({"fromCaller": phone, "transcriptText": "mijn nummer is 0612345678"})
    body = body[:-1] + b', "' + phone.encode() + b'": 1, "' + phone.encode() + b'": 2}'
    with caplog.at_level(logging.INFO):
        resp = await ingress.post(WEBHOOK_PATH, data=body, headers=signed(body, TEST_SECRET))
        assert resp.status == 400
        forged = await ingress.post(WEBHOOK_PATH, data=body, headers=signed(body, "wrong"))
        assert forged.status == 401

    refusals = [r for r in caplog.records if r.getMessage().startswith("refused request")]
    seen = [
        (r.levelno, vars(r)["request_id"], vars(r)["status"], vars(r)["problem"]) for r in refusals
    ]
    assert seen == [
        (logging.WARNING, resp.headers["X-Request-Id"], 400, "invalid-json"),
        (logging.WARNING, forged.headers["X-Request-Id"], 401, "unauthorized"),
    ]
    line = refusals[0].getMessage()
    assert "appears twice" in line
    assert "+31*******78" in line
    everything = caplog.text + "".join(str(vars(r)) for r in caplog.records)
    for secret in (phone, "612345678", "mijn nummer", TEST_SECRET):
        assert secret not in everything


async def test_the_rejected_topic_is_compacted_and_kept_for_the_quarantine_retention(
    ingress_settings: IngressSettings, kafka: KafkaSettings
) -> None:
    week = 7 * 24 * 3600 * 1000
    settings = replace(ingress_settings, kafka=replace(kafka, quarantine_retention_ms=week))
    client = await start_ingress(settings)
    try:
        resp = await client.post(
            WEBHOOK_PATH, data=NO_CALL_ID, headers=signed(NO_CALL_ID, TEST_SECRET)
        )
        assert resp.status == 422
    finally:
        await client.close()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        wanted = {"cleanup.policy": None, "retention.ms": None}
        [described] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, kafka.rejected_topic, wanted)]
        )
        configs = {entry[0]: entry[1] for entry in described.resources[0][4]}
    finally:
        await admin.close()
    assert configs == {"cleanup.policy": "compact,delete", "retention.ms": str(week)}


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 700):
        yield body[start : start + 700]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_an_oversized_authenticated_body_keeps_its_first_bytes_and_its_size(
    ingress_settings: IngressSettings, kafka: KafkaSettings, framing: str
) -> None:
    body = _flat(transcriptText="lang " * 2000)
    client = await start_ingress(replace(ingress_settings, max_body_bytes=1024))
    try:
        data = body if framing == "content-length" else _chunks(body)
        resp = await client.post(WEBHOOK_PATH, data=data, headers=signed(body, TEST_SECRET))
        assert resp.status == 413
        assert resp.headers[QUARANTINE_HEADER] in {"kafka", "spool"}
        # The whole body was signed: one changed byte past the limit and it is not kept.
        forged = body[:-2] + b" }"
        resp_forged = await client.post(
            WEBHOOK_PATH, data=forged, headers=signed(body, TEST_SECRET)
        )
        assert resp_forged.status == 413
        assert QUARANTINE_HEADER not in resp_forged.headers
        await wait_drained(client)
    finally:
        await client.close()
    [entry] = await _kept(kafka)
    assert entry.request_id == resp.headers["X-Request-Id"]
    assert (entry.status, entry.problem) == (413, "body-too-large")
    assert entry.body_size == len(body)
    assert entry.body_truncated
    assert entry.body == body[:1024]
