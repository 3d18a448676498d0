"""Reading a request body within bounds: size on the wire, size after gzip, and time."""

from __future__ import annotations

import asyncio
import zlib

import aiohttp
import aiohttp.http_exceptions
from aiohttp import web

from ingress.errors import Problem
from ingress.hygiene import Allowance

GZIP_MAGIC = b"\x1f\x8b"
# How a body read fails when the sender goes away (or breaks the framing) mid-body.
CUT_OFF = (
    ConnectionResetError,
    aiohttp.ClientPayloadError,
    aiohttp.http_exceptions.HttpProcessingError,
)


class BodyTooLarge(Problem):
    """A 413; `head` holds the bytes read before the limit was passed (none when the
    Content-Length alone said so), the rest still waits unread on the connection."""

    def __init__(self, limit: int, what: str, head: bytes = b"") -> None:
        super().__init__(413, "body-too-large", "Body too large", f"{what} exceeds {limit} bytes")
        self.head = head


async def read_wire_body(
    request: web.Request, limit: int, timeout: float, allowance: Allowance
) -> bytes:
    """The bytes as sent, refusing early on Content-Length and while streaming otherwise.

    The whole body must arrive within `timeout`, so a sender trickling bytes cannot hold a
    connection (and a slot of memory) for ever; every byte is counted against `allowance`
    before it is kept (all of a declared Content-Length at once, before any is read).
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge(limit, "Content-Length")
    allowance.take(declared or 0)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.content.iter_any():
                chunks.append(chunk)
                size += len(chunk)
                del chunk
                if size > limit:
                    raise BodyTooLarge(limit, "body", b"".join(chunks))
                if size > allowance.taken:
                    allowance.take(size - allowance.taken)
        return b"".join(chunks)
    except TimeoutError:
        raise Problem(
            408, "body-timeout", "Body too slow", f"the body did not arrive within {timeout:g} s"
        ) from None
    except CUT_OFF as exc:
        # The sender's problem, not a 500.
        raise Problem(
            400, "body-incomplete", "Body incomplete", f"the body ended early: {type(exc).__name__}"
        ) from None
    finally:
        # A sender that goes away leaves its exception in the request's payload, whose
        # traceback holds this frame: a cycle only the garbage collector would break, holding
        # the body's bytes until then. They go now.
        chunks.clear()


def decode_content(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo Content-Encoding, never inflating past `limit` bytes (a gzip bomb stops there)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in {"gzip", "x-gzip"}:
        raise Problem(
            415,
            "unsupported-encoding",
            "Unsupported Content-Encoding",
            f"Content-Encoding {encoding!r} is not supported (use gzip or none)",
        )
    if not body.startswith(GZIP_MAGIC):
        raise _bad_gzip("Content-Encoding is gzip but the body is not")
    # A gzip stream may hold several members back to back (RFC 1952); each is inflated in
    # turn, and the running total never passes `limit`.
    out = bytearray()
    rest = body
    while rest:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            out += inflater.decompress(rest, limit + 1 - len(out))
        except zlib.error as exc:
            raise _bad_gzip(f"gzip body is corrupt: {exc}") from exc
        if len(out) > limit or (not inflater.eof and inflater.unconsumed_tail):
            raise BodyTooLarge(limit, "decompressed body")
        if not inflater.eof:
            raise _bad_gzip("gzip body is truncated")
        rest = inflater.unused_data
        if rest and not rest.startswith(GZIP_MAGIC):
            raise _bad_gzip("bytes after the gzip data are not another gzip member")
    return bytes(out)


def _bad_gzip(detail: str) -> Problem:
    return Problem(400, "invalid-gzip", "Body is not gzip", detail)
