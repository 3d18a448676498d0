"""Who may post: Flireo's HMAC signature, or a plain shared token for senders that cannot sign.

The signature is checked over the raw request bytes, before anything parses them.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Mapping

from core.secret import Secret
from core.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, StreamVerifier, verify
from ingress.errors import unauthorized

TOKEN_HEADER = "X-Callstream-Token"  # noqa: S105 - a header name, not a secret


def _timestamp_seconds(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(raw)
    # The docs don't state the unit; a value this large can only be milliseconds.
    return value / 1000 if value > 1e11 else value


class Authenticator:
    def __init__(
        self,
        webhook_secrets: tuple[Secret, ...],
        shared_tokens: tuple[Secret, ...],
        tolerance_seconds: int,
    ) -> None:
        self._secrets = tuple(s.reveal().encode() for s in webhook_secrets)
        self._tokens = tuple(t.reveal().encode() for t in shared_tokens)
        self._tolerance = tolerance_seconds

    @property
    def enabled(self) -> bool:
        return bool(self._secrets or self._tokens)

    def stream_verifier(self, headers: Mapping[str, str]) -> StreamVerifier:
        """For a body too large to hold: feed it this, then pass it to check() as the body."""
        return StreamVerifier(headers.get(TIMESTAMP_HEADER, ""), self._secrets)

    def check(
        self, headers: Mapping[str, str], body: bytes | StreamVerifier, now: float | None = None
    ) -> str:
        """Returns how the request authenticated; raises a 401 Problem otherwise."""
        how = self.check_headers(headers, now)
        if how == "signature" and not self._matches(headers, body):
            raise unauthorized("signature does not match")
        return how

    def _matches(self, headers: Mapping[str, str], body: bytes | StreamVerifier) -> bool:
        signature = headers[SIGNATURE_HEADER]
        if isinstance(body, StreamVerifier):
            return body.verify(signature)
        return verify(body, headers[TIMESTAMP_HEADER], signature, self._secrets)

    def check_headers(self, headers: Mapping[str, str], now: float | None = None) -> str:
        """What the headers alone can settle, so a request that cannot authenticate is refused
        (401) before its body is read: no credential, a timestamp that is missing, malformed
        or outside the tolerance, a token that does not match. Returns how the request will
        authenticate; a signature still has to match the body (`check`)."""
        if not self.enabled:
            return "none"
        if headers.get(SIGNATURE_HEADER) is not None and self._secrets:
            self._check_timestamp(headers.get(TIMESTAMP_HEADER), now)
            return "signature"
        token = headers.get(TOKEN_HEADER)
        if token is not None and self._tokens:
            presented = token.encode()
            # Compare against every token without stopping early: timing says nothing.
            matched = [hmac.compare_digest(presented, t) for t in self._tokens]
            if any(matched):
                return "token"
            raise unauthorized(f"{TOKEN_HEADER} does not match")
        wanted = [
            h for h, on in ((SIGNATURE_HEADER, self._secrets), (TOKEN_HEADER, self._tokens)) if on
        ]
        raise unauthorized(f"missing {' or '.join(wanted)}")

    def _check_timestamp(self, timestamp: str | None, now: float | None) -> None:
        if not timestamp:
            raise unauthorized(f"missing {TIMESTAMP_HEADER}")
        try:
            signed_at = _timestamp_seconds(timestamp)
        except ValueError:
            raise unauthorized(f"{TIMESTAMP_HEADER} is not a number") from None
        current = time.time() if now is None else now
        if abs(current - signed_at) > self._tolerance:
            raise unauthorized(
                f"{TIMESTAMP_HEADER} is more than {self._tolerance} s away from the server's clock"
            )
