"""The one HMAC scheme callstream speaks both ways: Flireo signs its webhooks with it, and the
alerting consumer signs its own outgoing webhooks the same way."""

from __future__ import annotations

import hashlib
import hmac


def hmac_hex(secret: bytes, timestamp: str, body: bytes) -> str:
    """Hex HMAC-SHA256(secret, timestamp + "." + body)."""
    return hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
