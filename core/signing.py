"""The one HMAC scheme callstream speaks both ways: Flireo signs its webhooks with it, and the
alerting consumer signs its own outgoing webhooks the same way.

The header names and the webhook path live here, once: the ingress checks them, the sender,
the benchmark and the soak test produce them, and the OpenAPI document describes them.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable
from typing import Final

WEBHOOK_PATH: Final = "/webhooks/flireo"
TIMESTAMP_HEADER: Final = "X-Webhook-Timestamp"
SIGNATURE_HEADER: Final = "X-Webhook-Signature"
# Flireo names the event type in a header too; callstream reads the type from the body (the
# header is not signed), so only senders set it.
EVENT_HEADER: Final = "X-Webhook-Event"
# Flireo sends plain hex; some of its docs show the digest prefixed like this. Both verify.
SIGNATURE_PREFIX: Final = "sha256="


def hmac_hex(secret: bytes, timestamp: str, body: bytes) -> str:
    return hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(
    body: bytes,
    secret: str,
    *,
    at: float | None = None,
    prefixed: bool = False,
    event: str | None = None,
) -> dict[str, str]:
    """The headers Flireo sends with `body`, signed at `at` (default: now, whole seconds)."""
    timestamp = str(int(time.time() if at is None else at))
    digest = hmac_hex(secret.encode(), timestamp, body)
    headers = {
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: (SIGNATURE_PREFIX if prefixed else "") + digest,
    }
    if event is not None:
        headers[EVENT_HEADER] = event
    return headers


def verify(body: bytes, timestamp: str, signature: str, secrets: Iterable[bytes]) -> bool:
    """Only the HMAC, under any of the secrets: how old the timestamp may be is the
    receiver's policy."""
    verifier = StreamVerifier(timestamp, secrets)
    verifier.update(body)
    return verifier.verify(signature)


class StreamVerifier:
    """verify() for a body seen one chunk at a time, so that a body too large to hold can
    still be authenticated without being held."""

    def __init__(self, timestamp: str, secrets: Iterable[bytes]) -> None:
        self._macs = [hmac.new(s, timestamp.encode() + b".", hashlib.sha256) for s in secrets]

    def update(self, chunk: bytes) -> None:
        for mac in self._macs:
            mac.update(chunk)

    def verify(self, signature: str) -> bool:
        presented = signature.strip().removeprefix(SIGNATURE_PREFIX).lower().encode()
        # Compare against every secret without stopping early: timing says nothing.
        matched = [hmac.compare_digest(presented, m.hexdigest().encode()) for m in self._macs]
        return any(matched)
