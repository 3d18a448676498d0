"""Signed requests for the load generators, made in Python because wrk's Lua has no HMAC.

Every request in a pool is a complete HTTP/1.1 POST (headers and body) with its own call
id and a signature over a timestamp taken when the pool is made. A pool is made right
before the run that uses it, so every timestamp is seconds old when sent: well inside the
ingress's tolerance window (300 s by default) for any run this bench does.
"""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from core.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, WEBHOOK_PATH, sign

# Stands in for the call id in a body template; a fresh uuid4 has the same length, so
# swapping it in keeps the body (and its Content-Length) the same size.
_PLACEHOLDER = "00000000-0000-4000-8000-000000000000"
LONG_BODY_BYTES = 60_000
# A long call as the large-reports phase sends it (5 % of its reports): transcript + messages.
LONG_CALL_BYTES = 59_000
_POOL_MARKER = "--@@POOL@@"


@dataclass(frozen=True, slots=True)
class BodyTemplate:
    """One report body with a placeholder call id."""

    name: str
    body: bytes

    @property
    def size(self) -> int:
        return len(self.body)

    def fresh(self) -> tuple[str, bytes]:
        call_id = str(uuid.uuid4())
        return call_id, self.body.replace(_PLACEHOLDER.encode(), call_id.encode(), 1)


def sample_report(path: Path | None = None) -> dict[str, Any]:
    """A flat Flireo end-of-call report: the file at `path`, or the one shipped with callstream."""
    source = path or resources.files("callstream.bench").joinpath("sample-report.json")
    payload: dict[str, Any] = orjson.loads(source.read_bytes())
    if "callId" not in payload or not isinstance(payload.get("transcriptText"), str):
        raise ValueError(f"{source} is not a flat end-of-call report with a transcript")
    return payload


def templates(
    sample: Path | None = None, *, long_bytes: int = LONG_BODY_BYTES
) -> tuple[BodyTemplate, ...]:
    """The sample report as it is, and a variant whose transcript makes it `long_bytes`."""
    payload = sample_report(sample)
    payload["callId"] = _PLACEHOLDER
    payload["eventTimestamp"] = int(time.time() * 1000)
    short = orjson.dumps(payload)
    lines = payload["transcriptText"].splitlines()
    transcript: list[str] = []
    size = len(short)
    turn = 0
    while size < long_bytes:
        # A long call: the same kind of turns over and over, each slightly different.
        line = f"{lines[turn % len(lines)]} ({turn // len(lines) + 1})"
        transcript.append(line)
        size += len(line.encode()) + 2
        turn += 1
    payload["transcriptText"] = "\n".join(transcript)
    long_body = orjson.dumps(payload)
    return (
        BodyTemplate(f"sample {_kb(len(short))}", short),
        BodyTemplate(f"long transcript {_kb(len(long_body))}", long_body),
    )


def long_call(sample: Path | None = None, *, size: int = LONG_CALL_BYTES) -> BodyTemplate:
    """The sample report as a long call would send it, about `size` bytes: a long transcript,
    and the same turns again as `messages` ({role, content}, as Flireo's SDK describes them;
    the ingress keeps them in the record's extra_json)."""
    payload = sample_report(sample)
    payload["callId"] = _PLACEHOLDER
    payload["eventTimestamp"] = int(time.time() * 1000)
    lines = payload["transcriptText"].splitlines()
    base = len(orjson.dumps(payload)) - len(orjson.dumps(payload["transcriptText"]))
    turns: list[str] = []
    messages: list[dict[str, str]] = []
    total = base + len(b',"messages":[]')
    turn = 0
    while total < size:
        line = f"{lines[turn % len(lines)]} ({turn // len(lines) + 1})"
        speaker, _, said = line.partition(": ")
        message = {"role": "assistant" if speaker == "AI" else "user", "content": said}
        turns.append(line)
        messages.append(message)
        # The line in the transcript (its quotes' two bytes stand for the escaped newline),
        # the message and its comma in the list.
        total += len(orjson.dumps(line)) + len(orjson.dumps(message)) + 1
        turn += 1
    payload["transcriptText"] = "\n".join(turns)
    payload["messages"] = messages
    body = orjson.dumps(payload)
    return BodyTemplate(f"long call {_kb(len(body))}", body)


def _kb(size: int) -> str:
    return f"{size / 1000:.1f} kB"


@dataclass(frozen=True, slots=True)
class SignedRequest:
    call_id: str
    raw: bytes  # the whole request as it goes on the wire


def signed_requests(
    template: BodyTemplate, count: int, *, secret: str, host: str
) -> list[SignedRequest]:
    at = time.time()
    timestamp = str(int(at))
    head = (
        f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {template.size}\r\n"
        f"{TIMESTAMP_HEADER}: {timestamp}\r\n{SIGNATURE_HEADER}: "
    ).encode()
    out: list[SignedRequest] = []
    for _ in range(count):
        call_id, body = template.fresh()
        signature = sign(body, secret, at=at)[SIGNATURE_HEADER].encode()
        out.append(SignedRequest(call_id, head + signature + b"\r\n\r\n" + body))
    return out


def mixed_requests(
    short: BodyTemplate,
    long: BodyTemplate,
    count: int,
    *,
    long_every: int,
    secret: str,
    host: str,
) -> list[SignedRequest]:
    """`count` requests, every `long_every`-th one (0: none) with the long body."""
    n_long = count // long_every if long_every > 0 else 0
    longs = iter(signed_requests(long, n_long, secret=secret, host=host))
    shorts = iter(signed_requests(short, count - n_long, secret=secret, host=host))
    return [
        next(longs) if long_every > 0 and (i + 1) % long_every == 0 else next(shorts)
        for i in range(count)
    ]


# -- wrk: a generated Lua script with the pool in it -------------------------------------


def write_wrk_script(path: Path, requests: Sequence[SignedRequest]) -> Path:
    """wrk_post.lua with `requests` in place of its pool marker."""
    template = resources.files("callstream.bench").joinpath("wrk_post.lua").read_bytes()
    before, marker, after = template.partition(_POOL_MARKER.encode())
    if not marker:
        raise RuntimeError(f"wrk_post.lua lost its {_POOL_MARKER} line")
    with path.open("wb") as out:
        out.write(before)
        for request in requests:
            # A quoted Lua string rather than a long bracket: Lua turns the CRLFs of a long
            # bracket into plain LFs. Bytes >= 0x80 (UTF-8 in the transcript) are fine as they are.
            escaped = request.raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
            escaped = escaped.replace(b"\r", b"\\r").replace(b"\n", b"\\n")
            out.write(b'  "' + escaped + b'",\n')
        out.write(after)
    return path


# -- the open-loop client's pool file ----------------------------------------------------

_LENGTH = struct.Struct(">I")


def write_pool_file(path: Path, requests: Sequence[SignedRequest]) -> None:
    with path.open("wb") as out:
        for request in requests:
            out.write(_LENGTH.pack(len(request.raw)))
            out.write(request.raw)


def read_pool_file(path: Path) -> list[bytes]:
    data = path.read_bytes()
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        (length,) = _LENGTH.unpack_from(data, pos)
        pos += _LENGTH.size + length
        out.append(data[pos - length : pos])
    return out
