"""Posting a report the way Flireo does (signed), for `callstream send` and the benchmark."""

from __future__ import annotations

import time

import aiohttp

from core.secret import Secret
from ingress.auth import SIGNATURE_HEADER, TIMESTAMP_HEADER, TOKEN_HEADER, sign


def signed_headers(body: bytes, secret: Secret | None, token: Secret | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        timestamp = str(int(time.time()))
        headers[TIMESTAMP_HEADER] = timestamp
        headers[SIGNATURE_HEADER] = sign(secret.reveal(), timestamp, body)
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
