"""Posting a report the way Flireo does (signed), for `callstream send` and the benchmark."""

from __future__ import annotations

import aiohttp

from core.secret import Secret
from core.signing import sign
from ingress.auth import TOKEN_HEADER


def signed_headers(body: bytes, secret: Secret | None, token: Secret | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers |= sign(body, secret.reveal())
    elif token is not None:
        headers[TOKEN_HEADER] = token.reveal()
    return headers


async def post_report(
    url: str, body: bytes, *, secret: Secret | None, token: Secret | None, gzipped: bool = False
) -> tuple[int, str]:
    headers = signed_headers(body, secret, token)
    if gzipped:
        headers["Content-Encoding"] = "gzip"
    async with (
        aiohttp.ClientSession(auto_decompress=True) as session,
        session.post(url, data=body, headers=headers) as resp,
    ):
        return resp.status, await resp.text()
