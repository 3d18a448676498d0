"""Who may post: Flireo's HMAC signature, rotation, shared tokens, and the unsigned mode."""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path

import pytest

from callstream.bench.pool import BodyTemplate, signed_requests, write_wrk_script
from core.kafkasettings import KafkaSettings
from core.secret import Secret
from core.signing import EVENT_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, WEBHOOK_PATH, sign
from ingress.auth import TOKEN_HEADER, Authenticator
from ingress.errors import Problem
from ingress.settings import IngressSettings
from tests.conftest import TEST_SECRET, Client, start_ingress
from tests.signing import signed
from tests.support.topics import read_back


async def _post(
    client: Client, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, object]]:
    resp = await client.post(WEBHOOK_PATH, data=body, headers=headers)
    payload = await resp.json(content_type=None)
    return resp.status, payload


async def test_signature_matrix_and_nothing_published_for_refusals(
    ingress: Client, kafka: KafkaSettings, sample_bytes: bytes
) -> None:
    now = time.time()
    good = signed(sample_bytes, TEST_SECRET)
    cases: list[tuple[str, dict[str, str], int, str]] = [
        ("wrong secret", signed(sample_bytes, "not-the-secret"), 401, "signature does not match"),
        ("stale", signed(sample_bytes, TEST_SECRET, at=now - 310), 401, "away from the server"),
        ("from the future", signed(sample_bytes, TEST_SECRET, at=now + 310), 401, "away"),
        ("missing signature", {"Content-Type": "application/json"}, 401, "missing"),
        ("missing timestamp", {SIGNATURE_HEADER: good[SIGNATURE_HEADER]}, 401, "missing"),
        ("timestamp not a number", good | {TIMESTAMP_HEADER: "soon"}, 401, "not a number"),
        ("signed other bytes", signed(sample_bytes + b" ", TEST_SECRET), 401, "does not match"),
        ("garbage signature", good | {SIGNATURE_HEADER: "zz"}, 401, "does not match"),
    ]
    for name, headers, status, detail in cases:
        got, problem = await _post(ingress, sample_bytes, headers)
        assert got == status, name
        assert problem["type"] == "urn:callstream:problem:unauthorized", name
        assert detail in str(problem["detail"]), (name, problem)
    assert await read_back(kafka, kafka.topic, idle=1.0) == []

    for name, headers in [
        ("plain hex", signed(sample_bytes, TEST_SECRET, at=now)),
        # A second apart: the same signature in both spellings is one delivery, sent twice.
        ("sha256= prefix", signed(sample_bytes, TEST_SECRET, at=now + 1, prefixed=True)),
        ("milliseconds timestamp", _signed_ms(sample_bytes, TEST_SECRET)),
    ]:
        got, answer = await _post(ingress, sample_bytes, headers)
        assert got == 202, (name, answer)
    assert len(await read_back(kafka, kafka.topic, expect=3)) == 3


def _signed_ms(body: bytes, secret: str) -> dict[str, str]:
    return sign(body, secret, at=time.time() * 1000)


async def test_rotated_secrets_both_verify(
    ingress_settings: IngressSettings, sample_bytes: bytes
) -> None:
    settings = dataclasses.replace(
        ingress_settings, webhook_secrets=(Secret("new-secret"), Secret("old-secret"))
    )
    client = await start_ingress(settings)
    try:
        for secret in ("new-secret", "old-secret"):
            status, answer = await _post(client, sample_bytes, signed(sample_bytes, secret))
            assert status == 202, answer
        status, _ = await _post(client, sample_bytes, signed(sample_bytes, TEST_SECRET))
        assert status == 401
    finally:
        await client.close()


async def test_shared_token_for_senders_that_cannot_sign(
    ingress_settings: IngressSettings, sample_bytes: bytes
) -> None:
    settings = dataclasses.replace(
        ingress_settings, webhook_secrets=(), shared_tokens=(Secret("tok-1"), Secret("tok-2"))
    )
    client = await start_ingress(settings)
    try:
        assert (await _post(client, sample_bytes, {TOKEN_HEADER: "tok-2"}))[0] == 202
        status, problem = await _post(client, sample_bytes, {TOKEN_HEADER: "tok-3"})
        assert status == 401
        assert "does not match" in str(problem["detail"])
        assert (await _post(client, sample_bytes, {}))[0] == 401
    finally:
        await client.close()


async def test_without_secrets_unsigned_requests_pass_and_startup_warns(
    ingress_settings: IngressSettings, sample_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    settings = dataclasses.replace(ingress_settings, webhook_secrets=(), shared_tokens=())
    with caplog.at_level(logging.WARNING, logger="ingress.app"):
        client = await start_ingress(settings)
    try:
        assert any("NO WEBHOOK AUTHENTICATION" in r.getMessage() for r in caplog.records)
        assert (await _post(client, sample_bytes, {}))[0] == 202
    finally:
        await client.close()


def test_secrets_never_print() -> None:
    settings = IngressSettings(
        kafka=KafkaSettings(bootstrap_servers="x:1"),
        webhook_secrets=(Secret("s3cr3t-value"),),
        shared_tokens=(Secret("t0ken-value"),),
    )
    text = repr(settings) + str(settings)
    assert "s3cr3t-value" not in text
    assert "t0ken-value" not in text


def test_authenticator_compares_against_every_secret() -> None:
    auth = Authenticator((Secret("a"), Secret("b")), (), tolerance_seconds=300)
    body = b"{}"
    assert auth.check(sign(body, "b"), body) == "signature"
    with pytest.raises(Problem) as refused:
        auth.check(sign(body, "c"), body)
    assert refused.value.status == 401


def test_bench_requests_and_wrk_script_agree_with_the_signing_contract(tmp_path: Path) -> None:
    # wrk's Lua cannot sign, so the bench signs in Python and the script replays raw bytes;
    # any header name or path the script spells for itself must be core.signing's.
    template = BodyTemplate("tiny", b'{"callId": "00000000-0000-4000-8000-000000000000"}')
    (request,) = signed_requests(template, 1, secret=TEST_SECRET, host="h")
    head, _, body = request.raw.partition(b"\r\n\r\n")
    request_line, *header_lines = head.decode().split("\r\n")
    assert request_line == f"POST {WEBHOOK_PATH} HTTP/1.1"
    headers = dict(line.split(": ", 1) for line in header_lines)
    auth = Authenticator((Secret(TEST_SECRET),), (), tolerance_seconds=300)
    assert auth.check(headers, body) == "signature"

    script = write_wrk_script(tmp_path / "wrk.lua", [request]).read_text(encoding="utf-8")
    spelled = set(re.findall(r"X-Webhook-[A-Za-z]+|/webhooks/[a-z]+", script))
    assert spelled <= {SIGNATURE_HEADER, TIMESTAMP_HEADER, EVENT_HEADER, WEBHOOK_PATH}
    assert {SIGNATURE_HEADER, TIMESTAMP_HEADER, WEBHOOK_PATH} <= spelled
