"""Problems the ingress answers with: each becomes an RFC 9457 application/problem+json body."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

PROBLEM_CONTENT_TYPE = "application/problem+json"


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


def unauthorized(detail: str) -> Problem:
    return Problem(401, "unauthorized", "Authentication failed", detail)


def invalid(detail: str, pointer: str | None = None, *, status: int = 422) -> Problem:
    slug = "invalid-json" if status == 400 else "invalid-report"
    title = "Body is not acceptable JSON" if status == 400 else "Report breaks the contract"
    return Problem(status, slug, title, detail, pointer=pointer)
