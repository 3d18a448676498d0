"""The quarantine's record and what the ingress puts in it, without a broker."""

from __future__ import annotations

import gzip
import logging
from dataclasses import replace

import pytest
from multidict import CIMultiDict

from ingress.errors import Problem, log_refusal
from ingress.quarantine import REDACTED, redact
from schemas.codec import Decoder, single_object_encoder
from schemas.rejected import RejectedRequest
from schemas.store import REJECTED_REQUEST, default_store


def _entry(body: bytes, **headers: str) -> RejectedRequest:
    return RejectedRequest(
        request_id="req-1",
        received_at_ms=1_765_000_000_123,
        status=422,
        problem="invalid-report",
        title="Report breaks the contract",
        detail="is required",
        pointer="/message/call/id",
        body=body,
        body_size=len(body),
        body_truncated=False,
        headers=headers,
        authenticated_by="signature",
    )


def test_credentials_are_redacted_and_repeated_headers_joined() -> None:
    headers = CIMultiDict(
        [
            ("X-Webhook-Signature", "abc"),
            ("X-Callstream-Token", "t"),
            ("Authorization", "Bearer x"),
            ("X-Api-Key", "k"),
            ("Cookie", "s=1"),
            ("Via", "1.1 a"),
            ("Via", "1.1 b"),
            ("X-Webhook-Timestamp", "1765000000"),
        ]
    )
    assert redact(headers) == {
        "x-webhook-signature": REDACTED,
        "x-callstream-token": REDACTED,
        "authorization": REDACTED,
        "x-api-key": REDACTED,
        "cookie": REDACTED,
        "via": "1.1 a, 1.1 b",
        "x-webhook-timestamp": "1765000000",
    }


def test_an_entry_and_its_reprocessed_state_survive_the_codec() -> None:
    encoder = single_object_encoder(default_store().current(REJECTED_REQUEST))
    entry = _entry(b'{"message": {}}', **{"content-type": "application/json"})
    done = entry.reprocessed(1_765_000_100_000, "flireo.end-of-call-report", "call-1")
    decoder = Decoder(default_store())
    for kept in (entry, done):
        decoded = decoder.decode_local(encoder.encode(kept.to_record()))
        assert decoded.name == REJECTED_REQUEST
        assert RejectedRequest.from_record(decoded.record) == kept
    assert done.state == "REPROCESSED"
    assert done.body == entry.body


def test_a_gzip_body_is_inflated_within_the_limit_and_a_cut_one_is_not_read() -> None:
    payload = b'{"callId": "a"}'
    assert _entry(gzip.compress(payload), **{"content-encoding": "gzip"}).payload_bytes(100) == (
        payload
    )
    bomb = _entry(gzip.compress(b" " * 10_000), **{"content-encoding": "gzip"})
    assert bomb.payload_bytes(1000) is None
    assert _entry(payload, **{"content-encoding": "br"}).payload_bytes(100) is None
    assert replace(_entry(payload), body_truncated=True).payload_bytes(100) is None


def test_rate_limited_refusals_are_throttled_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ingress.errors"):
        for n in range(50):
            log_refusal(f"req-{n}", Problem(429, "rate-limited", "Too many", "slow down"))
    # One line at most (none if another test's 429 was logged within the interval).
    assert len([r for r in caplog.records if "rate-limited" in r.getMessage()]) <= 1
