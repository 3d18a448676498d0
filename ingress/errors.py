"""Problems the ingress answers with: each becomes an RFC 9457 application/problem+json body."""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson
from aiohttp import web

from core.logs import Throttled, mask_phone

PROBLEM_CONTENT_TYPE = "application/problem+json"
log = logging.getLogger(__name__)
# A detail names what was wrong, not the value; but a detail that quotes a JSON key, or a
# proxy's reason, could still carry a number: anything that looks like one is masked.
_PHONE_LIKE = re.compile(r"\+?\d[\d ().-]{5,}\d")
_MAX_LOGGED = 300
# A rate limit refuses a flood by definition: one line per refusal would flood the log with
# it, so those lines are throttled (with a count of the ones held back).
_FLOOD_SLUGS = frozenset({"rate-limited"})
_flood = Throttled(log)


class Problem(Exception):
    """A request the ingress refuses; `slug` is stable and documented, `detail` is for humans."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        *,
        pointer: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.pointer = pointer
        self.headers = headers or {}

    def response(self, request_id: str) -> web.Response:
        body: dict[str, Any] = {
            "type": f"urn:callstream:problem:{self.slug}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "requestId": request_id,
        }
        if self.pointer is not None:
            body["pointer"] = self.pointer
        return web.Response(
            status=self.status,
            body=orjson.dumps(body),
            content_type=PROBLEM_CONTENT_TYPE,
            headers=self.headers,
        )


def log_refusal(request_id: str, problem: Problem) -> None:
    """The one WARNING line every refusal gets: request id, status, slug, pointer, detail."""
    pointer = None if problem.pointer is None else _scrub(problem.pointer)
    detail = _scrub(problem.detail)
    if problem.slug in _FLOOD_SLUGS:
        _flood.warning(
            "refused request %s: %d %s: %s", request_id, problem.status, problem.slug, detail
        )
        return
    log.warning(
        "refused request %s: %d %s at %s: %s",
        request_id,
        problem.status,
        problem.slug,
        "-" if pointer is None else pointer or "/",
        detail,
        extra={
            "request_id": request_id,
            "status": problem.status,
            "problem": problem.slug,
            "pointer": pointer,
        },
    )


def _scrub(text: str) -> str:
    masked = _PHONE_LIKE.sub(lambda m: mask_phone(m.group()) or "", text)
    return masked if len(masked) <= _MAX_LOGGED else masked[:_MAX_LOGGED] + "..."


def unauthorized(detail: str) -> Problem:
    return Problem(401, "unauthorized", "Authentication failed", detail)


def invalid(detail: str, pointer: str | None = None, *, status: int = 422) -> Problem:
    slug = "invalid-json" if status == 400 else "invalid-report"
    title = "Body is not acceptable JSON" if status == 400 else "Report breaks the contract"
    return Problem(status, slug, title, detail, pointer=pointer)
