"""The quarantine: an authenticated request the ingress refuses with a 4xx is kept before the
answer, on `<topic>.rejected` (schemas/rejected.py), through the same durable path as a report
(Kafka, or the spool while Kafka is away). Flireo does not retry, so a refusal that is not kept
is a report lost for good.

What counts as authenticated: the signature or shared token was verified; with no
authentication configured, every request (the operator chose an open ingress, and refusing to
keep what it accepts to read would only lose reports). Requests that fail authentication, and
those refused before their body is read (rate limit, unknown path), are only counted.

If the quarantine itself cannot be made durable, the answer is a 503 with Retry-After rather
than the 4xx: a 4xx would tell the sender the request was dealt with, and it would be gone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from aiohttp import web

from core.signing import SIGNATURE_HEADER
from ingress.auth import TOKEN_HEADER, Authenticator
from ingress.body import CUT_OFF, BodyTooLarge
from ingress.errors import Problem
from ingress.kafkapublisher import PublishUnavailable
from ingress.publisher import DurablePublisher, OutgoingRecord
from ingress.settings import IngressSettings
from ingress.telemetry import IngressMetrics
from schemas.codec import Encoder
from schemas.rejected import RejectedRequest

# Names the answer carries so the sender (and an operator reading a capture) knows the refused
# request was kept, and where: kafka or spool.
QUARANTINE_HEADER: Final = "X-Callstream-Quarantined"
REDACTED: Final = "[redacted]"
_CREDENTIAL_HEADERS: Final = frozenset(
    h.lower()
    for h in (SIGNATURE_HEADER, TOKEN_HEADER, "Authorization", "Proxy-Authorization", "Cookie")
)
# Headers a proxy or another sender may carry credentials in, by the words their names use.
_CREDENTIAL_WORDS: Final = ("token", "secret", "signature", "auth", "api-key", "apikey", "password")
# Kafka's request limit is 1 MiB: the kept bytes leave room for the rest of the record.
MAX_KEPT_BYTES: Final = 900 * 1024
# An oversized body is read on (not kept) to check its signature, up to this many times the
# body limit; past it, or past the body timeout, it cannot be authenticated and is only counted.
DRAIN_FACTOR: Final = 16
# Already kept elsewhere: a request-response event with no configured answer was published to
# the events topic before its 422, so a second copy would only be reprocessed twice.
_KEPT_ELSEWHERE: Final = frozenset({"unsupported-event"})

Work = Callable[[], Awaitable[web.Response]]


def redact(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers by lower-case name (repeats joined), credentials replaced by [redacted]."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        if key in _CREDENTIAL_HEADERS or any(word in key for word in _CREDENTIAL_WORDS):
            value = REDACTED
        out[key] = f"{out[key]}, {value}" if key in out and value != REDACTED else value
    return out


class Quarantine:
    def __init__(
        self,
        publisher: DurablePublisher,
        settings: IngressSettings,
        auth: Authenticator,
        metrics: IngressMetrics,
    ) -> None:
        self._publisher = publisher
        self._settings = settings
        self._auth = auth
        self._metrics = metrics
        self._encoder: Encoder | None = None

    def bind(self, encoder: Encoder) -> None:
        """The encoder is known only once the app starts (it may come from the registry)."""
        self._encoder = encoder

    async def keep_refused(
        self,
        request_id: str,
        headers: Mapping[str, str],
        wire: bytes,
        authenticated_by: str,
        work: Work,
    ) -> web.Response:
        """`work`'s answer; a 4xx it raises is kept first (see the module's docstring)."""
        received_at_ms = int(time.time() * 1000)
        try:
            return await work()
        except Problem as problem:
            if 400 <= problem.status < 500 and problem.slug not in _KEPT_ELSEWHERE:
                await self.keep(
                    problem,
                    request_id=request_id,
                    headers=headers,
                    body=wire,
                    body_size=len(wire),
                    authenticated_by=authenticated_by,
                    received_at_ms=received_at_ms,
                )
            raise

    async def keep(
        self,
        problem: Problem,
        *,
        request_id: str,
        headers: Mapping[str, str],
        body: bytes,
        body_size: int,
        authenticated_by: str,
        received_at_ms: int,
    ) -> None:
        """Make the refused request durable and mark `problem`'s answer as kept; raises a 503
        Problem (the 4xx then never reaches the sender) when it cannot be kept."""
        assert self._encoder is not None, "Quarantine.bind() runs at start-up"
        entry = RejectedRequest(
            request_id=request_id,
            received_at_ms=received_at_ms,
            status=problem.status,
            problem=problem.slug,
            title=problem.title,
            detail=problem.detail,
            pointer=problem.pointer,
            body=body[:MAX_KEPT_BYTES],
            body_size=body_size,
            body_truncated=len(body) < body_size or len(body) > MAX_KEPT_BYTES,
            headers=redact(headers),
            authenticated_by=authenticated_by,
        )
        record = OutgoingRecord(
            topic=self._settings.kafka.rejected_topic,
            key=request_id.encode(),
            value=self._encoder.encode(entry.to_record()),
            headers=entry.record_headers(self._encoder).encode(),
        )
        try:
            durable = await self._publisher.publish(record)
        except PublishUnavailable as exc:
            self._metrics.quarantine_failed.inc()
            raise Problem(
                503,
                "unavailable",
                "Refused and not kept",
                f"the request is refused ({problem.status} {problem.slug}: {problem.detail}) and "
                f"could not be kept in the quarantine ({exc}); retry",
                pointer=problem.pointer,
                headers={"Retry-After": str(exc.retry_after)},
            ) from exc
        self._metrics.kept(problem.slug)
        problem.headers[QUARANTINE_HEADER] = durable

    async def keep_oversized(
        self, request: web.Request, request_id: str, problem: BodyTooLarge
    ) -> None:
        """Keep the first bytes and the size of a body over the limit, once the rest was
        read (not held) and the whole body authenticated; the signature covers all of it."""
        received_at_ms = int(time.time() * 1000)
        limit = self._settings.max_body_bytes
        declared = request.content_length
        if declared is not None and declared > DRAIN_FACTOR * limit:
            return
        verifier = self._auth.stream_verifier(request.headers)
        verifier.update(problem.head)
        # The first bytes up to the body limit: what the ingress would have read of it.
        keep = min(limit, MAX_KEPT_BYTES)
        head = bytearray(problem.head[:keep])
        size = len(problem.head)
        try:
            async with asyncio.timeout(self._settings.body_timeout_seconds):
                async for chunk in request.content.iter_any():
                    size += len(chunk)
                    if size > DRAIN_FACTOR * limit:
                        return
                    verifier.update(chunk)
                    head += chunk[: keep - len(head)]
        except (TimeoutError, *CUT_OFF):
            # Never whole: nothing can say who sent it.
            return
        try:
            how = self._auth.check(request.headers, verifier)
        except Problem:
            return
        await self.keep(
            problem,
            request_id=request_id,
            headers=request.headers,
            body=bytes(head),
            body_size=size,
            authenticated_by=how,
            received_at_ms=received_at_ms,
        )
