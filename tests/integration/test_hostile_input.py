"""Hostile input over real HTTP against the real ingress (real broker behind it).

Oracle: whatever arrives, the answer is 2xx or a documented 4xx in problem+json, never a
5xx, and the ingress keeps serving: a well-formed signed report still gets 202 afterwards.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.kafkasettings import KafkaSettings
from core.secret import Secret
from core.signing import WEBHOOK_PATH
from ingress.settings import IngressSettings
from tests.conftest import TEST_SECRET, Client, start_ingress
from tests.signing import signed
from tests.support.samples import SAMPLE
from tests.support.threadedhypothesis import RANDOM_USED_BY_ANOTHER_THREAD
from tests.support.topics import read_all

pytestmark = RANDOM_USED_BY_ANOTHER_THREAD

BODY_TIMEOUT = 1.5
LIMIT = 1_000_000
# One ingress serves every example in a row on purpose: it must survive all of them.
HYPOTHESIS = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
Sender = Callable[[bytes], tuple[int, str, dict[str, Any]]]


@pytest.fixture
def hostile_settings(kafka: KafkaSettings, tmp_path: Path) -> IngressSettings:
    return IngressSettings(
        kafka=kafka,
        host="127.0.0.1",
        port=0,
        webhook_secrets=(Secret(TEST_SECRET),),
        body_timeout_seconds=BODY_TIMEOUT,
        max_body_bytes=LIMIT,
        spool_dir=tmp_path / "spool",
    )


@pytest.fixture
async def hostile(hostile_settings: IngressSettings) -> AsyncIterator[Client]:
    client = await start_ingress(hostile_settings)
    try:
        yield client
    finally:
        await client.close()


def _sample() -> dict[str, Any]:
    payload: dict[str, Any] = orjson.loads(SAMPLE.read_bytes())
    return payload


def _fresh_report() -> bytes:
    payload = _sample()
    payload["callId"] = f"hostile-{time.monotonic_ns()}"
    return orjson.dumps(payload)


async def post(client: Client, body: bytes, **headers: str) -> tuple[int, str, dict[str, Any]]:
    """Signed POST; (status, content type, parsed body or {})."""
    resp = await client.post(WEBHOOK_PATH, data=body, headers=signed(body, TEST_SECRET) | headers)
    text = await resp.read()
    parsed = orjson.loads(text) if resp.content_type.endswith("json") else {}
    return resp.status, resp.content_type, parsed


def assert_refused_properly(status: int, content_type: str, body: dict[str, Any]) -> None:
    assert 400 <= status < 500, (status, body)
    assert content_type == "application/problem+json"
    assert body["status"] == status
    assert body["type"].startswith("urn:callstream:problem:")


async def assert_still_serving(client: Client) -> None:
    status, _, body = await post(client, _fresh_report())
    assert status == 202, body


# -- any JSON value ---------------------------------------------------------------------------

# Integers well past 64 bits and floats of every kind: the parser must refuse, not crash.
_numbers = st.one_of(
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**70),
    st.integers(min_value=-(2**70), max_value=-(2**63) + 2),
    st.floats(allow_nan=True, allow_infinity=True),
)
_scalars = st.one_of(st.none(), st.booleans(), _numbers, st.text(max_size=40))
json_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=12), children, max_size=5),
    ),
    max_leaves=30,
)
_SAMPLE_KEYS = sorted(_sample())


@st.composite
def near_valid_reports(draw: st.DrawFn) -> Any:
    """The sample with one field (or the whole `analysis`) swapped for any JSON value, in
    any of the shapes: closer to the normaliser's edge cases than random JSON gets."""
    payload = _sample()
    payload[draw(st.sampled_from([*_SAMPLE_KEYS, "message"]))] = draw(json_values)
    return payload


def _dumps(value: Any) -> bytes:
    # The standard library writes integers of any size and NaN/Infinity literals, which is
    # exactly what a hostile sender would send; orjson would refuse to.
    return json.dumps(value).encode()


async def _in_thread_against(client: Client, body_test: Callable[[Sender], None]) -> None:
    """Run a (synchronous) Hypothesis test in a worker thread whose requests go through this
    loop's client, then check that the ingress survived every example."""
    loop = asyncio.get_running_loop()

    def send(body: bytes) -> tuple[int, str, dict[str, Any]]:
        return asyncio.run_coroutine_threadsafe(post(client, body), loop).result(timeout=60)

    await asyncio.to_thread(body_test, send)
    await assert_still_serving(client)


def _no_server_error(answer: tuple[int, str, dict[str, Any]]) -> None:
    status, content_type, body = answer
    if status >= 300:
        assert_refused_properly(status, content_type, body)
    else:
        assert status == 202, body


async def test_any_json_value_is_answered_2xx_or_4xx(hostile: Client) -> None:
    def body_test(send: Sender) -> None:
        @HYPOTHESIS
        @given(value=st.one_of(json_values, near_valid_reports()))
        def check(value: Any) -> None:
            _no_server_error(send(_dumps(value)))

        check()

    await _in_thread_against(hostile, body_test)


async def test_arbitrary_bytes_are_answered_2xx_or_4xx(hostile: Client) -> None:
    def body_test(send: Sender) -> None:
        @HYPOTHESIS
        @given(body=st.binary(max_size=300))
        def check(body: bytes) -> None:
            _no_server_error(send(body))

        check()

    await _in_thread_against(hostile, body_test)


# -- malformed text, numbers, nesting -------------------------------------------------------

_REPORT_PREFIX = _fresh_report()[:-1]

MALFORMED: list[tuple[str, bytes, int]] = [
    ("lone continuation byte", b'{"eventType":"\x80"}', 400),
    ("overlong encoding of /", b'{"eventType":"\xc0\xaf"}', 400),
    ("truncated 3-byte sequence", b'{"eventType":"\xe2\x82"}', 400),
    ("encoded surrogate", b'{"eventType":"\xed\xa0\x80"}', 400),
    ("escaped lone surrogate", b'{"eventType":"\\ud800"}', 400),
    ("beyond U+10FFFF", b'{"eventType":"\xf4\x90\x80\x80"}', 400),
    ("latin-1 body", '{"eventType":"café"}'.encode("latin-1"), 400),
    ("UTF-16 body", '{"eventType":"x"}'.encode("utf-16"), 400),
    ("BOM then JSON", b'\xef\xbb\xbf{"eventType":"x"}', 400),
    ("NUL in the middle", b'{"eventType":"end-of-call-report"\x00}', 400),
    ("empty body", b"", 400),
    ("only whitespace", b"   \n\t ", 400),
    ("two documents", b"{}{}", 400),
    ("2**64", _REPORT_PREFIX + b',"n":18446744073709551616}', 400),
    ("-2**63-1", _REPORT_PREFIX + b',"n":-9223372036854775809}', 400),
    ("10**400", _REPORT_PREFIX + b',"n":1' + b"0" * 400 + b"}", 400),
    ("1e400 overflows", _REPORT_PREFIX + b',"n":1e400}', 400),
    ("-1e400 overflows", _REPORT_PREFIX + b',"n":-1e400}', 400),
    (
        "huge duration",
        _REPORT_PREFIX.replace(b'"callLengthSeconds":132.5', b'"callLengthSeconds":1' + b"0" * 30)
        + b"}",
        400,
    ),
    ("nested event type is a list", b'{"message":{"type":["end-of-call-report"]}}', 422),
    ("nested event type is an object", b'{"message":{"type":{},"call":{}}}', 422),
    ("NaN", _REPORT_PREFIX + b',"n":NaN}', 400),
    ("-Infinity", _REPORT_PREFIX + b',"n":-Infinity}', 400),
    ("20-digit run inside a string is fine", _REPORT_PREFIX + b',"s":"12345678901234567890"}', 202),
    ("2**63-1 is fine", _REPORT_PREFIX + b',"n":9223372036854775807}', 202),
    ("1e-400 is zero, fine", _REPORT_PREFIX + b',"n":1e-400}', 202),
]


@pytest.mark.parametrize(("name", "body", "expected"), MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_malformed_text_and_numbers(
    hostile: Client, name: str, body: bytes, expected: int
) -> None:
    status, content_type, answer = await post(hostile, body)
    assert status == expected, (name, answer)
    if expected >= 400:
        assert_refused_properly(status, content_type, answer)


def _nested(depth: int, inner: bytes = b"1") -> bytes:
    return _REPORT_PREFIX + b',"deep":' + b"[" * depth + inner + b"]" * depth + b"}"


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("65 levels", _nested(64)),
        # orjson gives up at 1024 levels; past that it must still be a 400, not a crash.
        ("1,000 levels", _nested(1_000)),
        ("100,000 levels", _nested(100_000)),
        # A 19+ digit run sends the body through the standard library's parser, which
        # recurses: deep nesting there must not become a RecursionError 500.
        ("1,000 levels and a long integer", _nested(1_000, b"12345678901234567890123")),
        ("50,000 levels and a long integer", _nested(50_000, b"12345678901234567890123")),
        ("deep objects", _REPORT_PREFIX + b',"d":' + b'{"a":' * 5_000 + b"1" + b"}" * 5_000 + b"}"),
        ("unclosed", _REPORT_PREFIX + b',"d":' + b"[" * 200_000 + b"}"),
    ],
)
async def test_deep_nesting_is_refused_with_400(hostile: Client, name: str, body: bytes) -> None:
    status, content_type, answer = await post(hostile, body)
    assert status == 400, (name, answer)
    assert_refused_properly(status, content_type, answer)
    await assert_still_serving(hostile)


async def test_64_levels_of_nesting_are_accepted(hostile: Client) -> None:
    # The report object itself is the first level.
    status, _, answer = await post(hostile, _nested(63))
    assert status == 202, answer


# -- gzip ---------------------------------------------------------------------------------


def _gzip_stream(size: int, chunk: bytes = b"\0" * 1_048_576) -> bytes:
    """gzip of `size` bytes of zeros, without holding them all in memory."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = []
    left = size
    while left > 0:
        piece = chunk[: min(left, len(chunk))]
        parts.append(compressor.compress(piece))
        left -= len(piece)
    parts.append(compressor.flush())
    return b"".join(parts)


GZIP_CASES: list[tuple[str, Callable[[], bytes], int]] = [
    # 512 MiB inflated from ~0.5 MB on the wire, so the wire size alone does not stop it.
    ("512 MiB of zeros", lambda: _gzip_stream(512 * 1024 * 1024), 413),
    ("just over the limit", lambda: _gzip_stream(LIMIT + 1), 413),
    ("gzip inside gzip", lambda: gzip.compress(gzip.compress(b'{"eventType":"x"}')), 400),
    ("truncated", lambda: gzip.compress(_fresh_report())[:-20], 400),
    ("corrupt deflate data", lambda: gzip.compress(_fresh_report())[:12] + b"\xff" * 64, 400),
    ("only the magic bytes", lambda: b"\x1f\x8b", 400),
    ("plain body labelled gzip", _fresh_report, 400),
]


@pytest.mark.parametrize(("name", "wire", "expected"), GZIP_CASES, ids=[c[0] for c in GZIP_CASES])
async def test_gzip_bombs_and_broken_gzip_are_refused(
    hostile: Client, name: str, wire: Callable[[], bytes], expected: int
) -> None:
    body = await asyncio.to_thread(wire)
    assert len(body) <= LIMIT
    status, content_type, answer = await post(hostile, body, **{"Content-Encoding": "gzip"})
    assert status == expected, (name, answer)
    assert_refused_properly(status, content_type, answer)
    await assert_still_serving(hostile)


async def test_gzip_exactly_at_the_limit_is_inflated(hostile: Client) -> None:
    report = _fresh_report()
    padded = report[:-1] + b',"pad":"' + b"x" * (LIMIT - len(report) - 9) + b'"}'
    assert len(padded) == LIMIT
    status, _, answer = await post(hostile, gzip.compress(padded), **{"Content-Encoding": "gzip"})
    assert status == 202, answer


# -- oversized bodies -----------------------------------------------------------------------


async def test_oversized_body_with_content_length_gets_413(hostile: Client) -> None:
    body = b'{"eventType":"' + b"x" * LIMIT + b'"}'
    status, content_type, answer = await post(hostile, body)
    assert status == 413, answer
    assert_refused_properly(status, content_type, answer)
    await assert_still_serving(hostile)


async def test_oversized_body_chunked_without_content_length_gets_413(hostile: Client) -> None:
    chunk = b"x" * 65_536
    chunks = math.ceil(3 * LIMIT / len(chunk))

    async def body() -> AsyncIterator[bytes]:
        yield b'{"eventType":"'
        for _ in range(chunks):
            yield chunk

    headers = signed(b"unknowable", TEST_SECRET)
    resp = await hostile.post(WEBHOOK_PATH, data=body(), headers=headers)
    assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in resp.request_info.headers
    assert resp.status == 413
    assert_refused_properly(resp.status, resp.content_type, await resp.json())
    await assert_still_serving(hostile)


async def test_content_length_lie_is_refused_before_reading(hostile: Client) -> None:
    """A Content-Length over the limit is refused at once, whatever follows."""
    host, port = _address(hostile)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        # Signed (over bytes never sent): an unsigned one is refused (401) before its size.
        credentials = "".join(f"{k}: {v}\r\n" for k, v in signed(b"", TEST_SECRET).items())
        writer.write(
            f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: {host}\r\n{credentials}"
            f"Content-Length: {LIMIT * 1000}\r\n\r\n".encode()
        )
        await writer.drain()
        status_line, _, payload = await asyncio.wait_for(_read_response(reader), timeout=5)
        assert status_line.startswith(b"HTTP/1.1 413"), status_line
        assert orjson.loads(payload)["type"] == "urn:callstream:problem:body-too-large"
    finally:
        writer.close()
        await writer.wait_closed()


# -- a slow sender -----------------------------------------------------------------------------


def _address(client: Client) -> tuple[str, int]:
    url = client.make_url("/")
    assert url.host is not None
    assert url.port is not None
    return url.host, url.port


async def test_slow_sender_gets_408_and_others_are_served_meanwhile(hostile: Client) -> None:
    body = _fresh_report()
    headers = signed(body, TEST_SECRET) | {"Content-Length": str(len(body)), "Host": "x"}
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    host, port = _address(hostile)
    reader, writer = await asyncio.open_connection(host, port)

    async def trickle() -> None:
        """The headers at once, then the body three bytes every half second (~10 min)."""
        writer.write(f"POST {WEBHOOK_PATH} HTTP/1.1\r\n{head}\r\n".encode())
        await writer.drain()
        for offset in range(0, len(body), 3):
            writer.write(body[offset : offset + 3])
            await writer.drain()
            await asyncio.sleep(0.5)

    # The first request also waits for the ingress's first Kafka connection: not measured.
    await assert_still_serving(hostile)
    started = time.monotonic()
    sending = asyncio.create_task(trickle())
    try:
        # While the slow sender holds its connection, other senders are answered promptly.
        for _ in range(5):
            before = time.monotonic()
            await assert_still_serving(hostile)
            assert time.monotonic() - before < BODY_TIMEOUT
            await asyncio.sleep(0.1)
        status_line, response_headers, payload = await asyncio.wait_for(
            _read_response(reader), timeout=BODY_TIMEOUT + 15
        )
        elapsed = time.monotonic() - started
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)
    assert status_line.startswith(b"HTTP/1.1 408"), status_line
    assert response_headers[b"content-type"] == b"application/problem+json"
    assert orjson.loads(payload)["type"] == "urn:callstream:problem:body-timeout"
    assert BODY_TIMEOUT - 0.2 <= elapsed < BODY_TIMEOUT + 5
    await assert_still_serving(hostile)


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """(status line, lower-cased headers, body) of one HTTP/1.1 response with Content-Length."""
    raw = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = raw[:-4].split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    payload = await reader.readexactly(int(headers[b"content-length"]))
    return status_line, headers, payload


# -- signatures ---------------------------------------------------------------------------------


async def test_replayed_request_outside_the_tolerance_gets_401(
    hostile: Client, hostile_settings: IngressSettings
) -> None:
    body = _fresh_report()
    tolerance = hostile_settings.signature_tolerance_seconds
    for at in (time.time() - tolerance - 5, time.time() + tolerance + 5):
        # A genuine signature, captured and sent again later (or from a skewed clock).
        headers = signed(body, TEST_SECRET, at=at)
        resp = await hostile.post(WEBHOOK_PATH, data=body, headers=headers)
        assert resp.status == 401
        assert_refused_properly(resp.status, resp.content_type, await resp.json())


async def test_signature_over_different_bytes_gets_401(hostile: Client) -> None:
    body = _fresh_report()
    tampered = body.replace(b"132.5", b"999.5")
    assert tampered != body
    cases = [
        (tampered, signed(body, TEST_SECRET)),
        # Signed over the JSON, sent gzip'd: the signature covers the bytes on the wire.
        (gzip.compress(body), signed(body, TEST_SECRET) | {"Content-Encoding": "gzip"}),
        (body, signed(body, "another-secret")),
        (body, signed(body + b" ", TEST_SECRET)),
    ]
    for wire, headers in cases:
        resp = await hostile.post(WEBHOOK_PATH, data=wire, headers=headers)
        assert resp.status == 401
        assert_refused_properly(resp.status, resp.content_type, await resp.json())
    await assert_still_serving(hostile)


# -- a key written twice ----------------------------------------------------------------------


def _report_with(tail: bytes) -> bytes:
    return _REPORT_PREFIX + b"," + tail + b"}"


@pytest.mark.parametrize(
    ("name", "body", "pointer"),
    [
        ("callId twice", _report_with(b'"callId":"the-other-call"'), "/callId"),
        (
            "nested, in an unknown object",
            _report_with(b'"notes":{"summary":"a","structuredData":{"x":1,"x":2}}'),
            "/notes/structuredData/x",
        ),
        (
            # The report's own `analysis` again: the outer repeat is the first in the text.
            "analysis twice",
            _report_with(b'"analysis":{"summary":"a","structuredData":{"x":1,"x":2}}'),
            "/analysis",
        ),
        ("white space before the colon", _report_with(b'"callId" :"the-other-call"'), "/callId"),
    ],
)
async def test_a_key_written_twice_is_refused_with_400_naming_it(
    hostile: Client, name: str, body: bytes, pointer: str
) -> None:
    status, content_type, answer = await post(hostile, body)
    assert status == 400, (name, answer)
    assert_refused_properly(status, content_type, answer)
    key = pointer.rsplit("/", 1)[1]
    assert answer["detail"] == f"the key {key!r} appears twice in one object", answer
    assert answer["pointer"] == pointer, answer
    await assert_still_serving(hostile)


@pytest.mark.parametrize(
    ("name", "tail"),
    [
        ("an escaped quote before a colon inside a string", b'"note":"he said \\"hi\\": ok"'),
        ("white space before colons, no key twice", b'"note" : "x", "other"\t:\n1'),
        ("the same key in two different objects", b'"a":{"k":1},"b":{"k":2}'),
    ],
)
async def test_keys_that_only_look_repeated_are_accepted(
    hostile: Client, name: str, tail: bytes
) -> None:
    status, _, answer = await post(hostile, _report_with(tail))
    assert status == 202, (name, answer)


# -- a signed request sent again ---------------------------------------------------------------


async def test_a_replayed_signed_request_gets_the_same_202_and_is_published_once(
    hostile: Client, hostile_settings: IngressSettings
) -> None:
    """Oracle: the same signed bytes posted again (some at once, some later, within the
    tolerance) all get the first 202, word for word, and the topic holds one record; the
    same report signed anew (a resend) is a second delivery."""
    body = _fresh_report()
    headers = signed(body, TEST_SECRET)

    async def send(with_headers: dict[str, str]) -> tuple[int, bytes]:
        resp = await hostile.post(WEBHOOK_PATH, data=body, headers=with_headers)
        return resp.status, await resp.read()

    at_once = await asyncio.gather(*(send(headers) for _ in range(5)))
    later = [await send(headers) for _ in range(5)]
    assert {status for status, _ in at_once + later} == {202}
    assert len({answer for _, answer in at_once + later}) == 1
    metrics = await (await hostile.get("/metrics")).text()
    assert 'callstream_ingress_requests_total{outcome="replayed"} 9.0' in metrics

    call_id = orjson.loads(body)["callId"]
    kafka = hostile_settings.kafka
    assert [r.raw.key for r in await read_all(kafka, kafka.topic)] == [call_id.encode()]

    resent = signed(body, TEST_SECRET, at=time.time() + 1)
    status, answer = await send(resent)
    assert status == 202
    assert orjson.loads(answer)["requestId"] != orjson.loads(later[0][1])["requestId"]
    assert len(await read_all(kafka, kafka.topic)) == 2


async def test_with_replay_detection_off_a_replay_is_published_again(
    hostile_settings: IngressSettings,
) -> None:
    client = await start_ingress(replace(hostile_settings, replay_detection=False))
    try:
        body = _fresh_report()
        headers = signed(body, TEST_SECRET)
        for _ in range(2):
            assert (await client.post(WEBHOOK_PATH, data=body, headers=headers)).status == 202
    finally:
        await client.close()
    kafka = hostile_settings.kafka
    assert len(await read_all(kafka, kafka.topic)) == 2
