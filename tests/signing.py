"""Request headers the way Flireo signs them, with the content type a real post carries."""

from __future__ import annotations

from core.signing import sign


def signed(
    body: bytes, secret: str, *, at: float | None = None, prefixed: bool = False
) -> dict[str, str]:
    return {"Content-Type": "application/json", **sign(body, secret, at=at, prefixed=prefixed)}
