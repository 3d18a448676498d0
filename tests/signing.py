"""Request headers the way Flireo signs them."""

from __future__ import annotations

import time

from ingress.auth import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign


def signed(
    body: bytes, secret: str, *, at: float | None = None, prefix: str = ""
) -> dict[str, str]:
    timestamp = str(int(time.time() if at is None else at))
    return {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: prefix + sign(secret, timestamp, body),
    }
