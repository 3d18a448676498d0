"""Request hygiene on a real ingress over raw sockets: what one client, or many, may hold.

Oracle: a slow or idle connection is closed, a connection past the cap and a body past the
in-flight budget get 503 problem+json with Retry-After, an unauthenticated request is refused
before its body is read, and afterwards a well-formed signed report still gets 202.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import orjson
import pytest

from core.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, WEBHOOK_PATH
from ingress.settings import IngressSettings
from tests.conftest import TEST_SECRET, Client, start_ingress
from tests.signing import signed
from tests.support.samples import SAMPLE

# Generous: the machine may be loaded. Each case would otherwise wait far longer (aiohttp's
# keep-alive is an hour; the body timeout below is a minute).
CLOSED_WITHIN = 20.0
BODY_TIMEOUT = 60.0

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _fresh_report() -> bytes:
    payload: dict[str, Any] = orjson.loads(SAMPLE.read_bytes())
    payload["callId"] = f"hygiene-{time.monotonic_ns()}"
    return orjson.dumps(payload)


@contextlib.asynccontextmanager
async def _running(settings: IngressSettings, **changes: Any) -> AsyncIterator[Client]:
    client = await start_ingress(replace(settings, body_timeout_seconds=BODY_TIMEOUT, **changes))
    try:
        yield client
    finally:
        await client.close()


async def _connect(client: Client) -> Stream:
    url = client.make_url("/")
    assert url.host is not None
    assert url.port is not None
    return await asyncio.open_connection(url.host, url.port)


async def _close(stream: Stream) -> None:
    stream[1].close()
    await asyncio.gather(stream[1].wait_closed(), return_exceptions=True)


def _head(headers: dict[str, str], path: str = WEBHOOK_PATH, method: str = "POST") -> bytes:
    lines = "".join(f"{name}: {value}\r\n" for name, value in ({"Host": "x"} | headers).items())
    return f"{method} {path} HTTP/1.1\r\n{lines}\r\n".encode()


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLOSED_WITHIN)
    status_line, *lines = raw[:-4].decode().split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    payload = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, payload


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes the connection within CLOSED_WITHIN (nothing is expected)."""
    try:
        leftover = await asyncio.wait_for(reader.read(), CLOSED_WITHIN)
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    assert leftover == b"", leftover
    return True


async def _post_signed(stream: Stream) -> tuple[int, bytes]:
    """A fresh signed report on `stream`: (status, body of the answer)."""
    reader, writer = stream
    body = _fresh_report()
    writer.write(_head(signed(body, TEST_SECRET) | {"Content-Length": str(len(body))}) + body)
    status, _, payload = await _response(reader)
    return status, payload


async def _assert_still_serving(client: Client) -> None:
    body = _fresh_report()
    resp = await client.post(WEBHOOK_PATH, data=body, headers=signed(body, TEST_SECRET))
    assert resp.status == 202, await resp.text()


async def _counted(client: Client, outcome: str) -> float:
    return await _gauge(client, f'callstream_ingress_requests_total{{outcome="{outcome}"}}')


async def _gauge(client: Client, series: str) -> float:
    """The value of one series on /metrics (name and labels as Prometheus prints them)."""
    text = await (await client.get("/metrics")).text()
    values = [line.removeprefix(series + " ") for line in text.splitlines()]
    found = [v for v, line in zip(values, text.splitlines(), strict=True) if v != line]
    assert found, f"no {series} series"
    return float(found[0])


def _assert_problem(status: int, headers: dict[str, str], payload: bytes, slug: str) -> None:
    assert headers["content-type"] == "application/problem+json"
    problem = orjson.loads(payload)
    assert problem["status"] == status
    assert problem["type"] == f"urn:callstream:problem:{slug}", problem


# -- slow and idle connections ------------------------------------------------------------------


@pytest.fixture
async def short_timeouts(ingress_settings: IngressSettings) -> AsyncIterator[Client]:
    async with _running(
        ingress_settings, header_timeout_seconds=1.0, keepalive_timeout_seconds=1.0
    ) as client:
        yield client


@pytest.fixture
async def long_keepalive(ingress_settings: IngressSettings) -> AsyncIterator[Client]:
    """A short header timeout, a long keep-alive: only the header deadline closes early."""
    async with _running(
        ingress_settings, header_timeout_seconds=1.0, keepalive_timeout_seconds=600.0
    ) as client:
        yield client


async def test_a_client_trickling_its_headers_is_closed_after_the_header_timeout(
    long_keepalive: Client,
) -> None:
    client = long_keepalive
    reader, writer = stream = await _connect(client)
    head = _head({"Content-Type": "application/json", "X-Padding": "p" * 400})

    async def trickle() -> None:
        for byte in head:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.2)

    sending = asyncio.create_task(trickle())
    try:
        assert await _closed_by_server(reader), "a slowloris client was never closed"
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        await _close(stream)
    await _assert_still_serving(client)


async def test_an_idle_keep_alive_connection_is_closed(short_timeouts: Client) -> None:
    reader, writer = stream = await _connect(short_timeouts)
    try:
        writer.write(_head({}, "/healthz", "GET"))
        status, headers, _ = await _response(reader)
        assert status == 200
        assert headers.get("connection", "keep-alive").lower() != "close"
        # Nothing more is sent: the connection sits idle until the ingress closes it.
        assert await _closed_by_server(reader), "an idle connection was never closed"
    finally:
        await _close(stream)


async def test_a_connection_that_never_sends_a_byte_is_closed(short_timeouts: Client) -> None:
    reader, _ = stream = await _connect(short_timeouts)
    try:
        assert await _closed_by_server(reader)
    finally:
        await _close(stream)


async def test_requests_sent_in_good_time_share_a_kept_alive_connection(
    short_timeouts: Client,
) -> None:
    stream = await _connect(short_timeouts)
    try:
        for _ in range(3):
            status, payload = await _post_signed(stream)
            assert status == 202, payload
    finally:
        await _close(stream)


async def test_the_header_timeout_leaves_a_kept_alive_connection_alone(
    long_keepalive: Client,
) -> None:
    reader, writer = stream = await _connect(long_keepalive)
    try:
        # Refused before its body, which then arrives anyway and is read off.
        body = _fresh_report()
        writer.write(_head({"Content-Length": str(len(body))}))
        status, _, _ = await _response(reader)
        assert status == 401
        writer.write(body)
        # Idle for longer than the header timeout, then a request in one go.
        await asyncio.sleep(2.5)
        status, payload = await _post_signed(stream)
        assert status == 202, payload
    finally:
        await _close(stream)


# -- the connection cap ---------------------------------------------------------------------------

CAP = 3


async def test_a_webhook_on_a_connection_past_the_cap_gets_503_at_once(
    ingress_settings: IngressSettings,
) -> None:
    async with _running(ingress_settings, max_connections=CAP) as client:
        await _assert_still_serving(client)
        # At least CAP connections besides the test client's pooled one.
        idle = [await _connect(client) for _ in range(CAP)]
        reader, writer = extra = await _connect(client)
        try:
            body = _fresh_report()
            # The headers only: the answer must not wait for a body.
            writer.write(_head(signed(body, TEST_SECRET) | {"Content-Length": str(len(body))}))
            status, headers, payload = await _response(reader)
            assert status == 503, payload
            _assert_problem(status, headers, payload, "over-capacity")
            assert headers["retry-after"] == "1"
            assert headers["connection"].lower() == "close"
            assert await _closed_by_server(reader)
        finally:
            for stream in [*idle, extra]:
                await _close(stream)
        await _served_again_on_a_new_connection(client)
        assert await _counted(client, "over-capacity") >= 1


async def _served_again_on_a_new_connection(client: Client) -> None:
    """Once the cap's connections close, a new connection is served (the ingress notices a
    closed connection in its own time: poll)."""
    deadline = time.monotonic() + CLOSED_WITHIN
    while True:
        stream = await _connect(client)
        try:
            status, payload = await _post_signed(stream)
        finally:
            await _close(stream)
        if status == 202:
            return
        assert status == 503, payload
        assert time.monotonic() < deadline, payload
        await asyncio.sleep(0.2)


async def test_probes_are_answered_past_the_cap(ingress_settings: IngressSettings) -> None:
    async with _running(ingress_settings, max_connections=1) as client:
        idle = await _connect(client)
        reader, writer = probe = await _connect(client)
        try:
            writer.write(_head({}, "/healthz", "GET"))
            status, _, _ = await _response(reader)
            assert status == 200
        finally:
            await _close(idle)
            await _close(probe)


# -- authentication before the body ---------------------------------------------------------------


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param({}, id="no-signature"),
        pytest.param({SIGNATURE_HEADER: "0" * 64}, id="no-timestamp"),
        pytest.param(
            {SIGNATURE_HEADER: "0" * 64, TIMESTAMP_HEADER: str(int(time.time()) - 3600)},
            id="stale-timestamp",
        ),
        pytest.param({SIGNATURE_HEADER: "0" * 64, TIMESTAMP_HEADER: "soon"}, id="bad-timestamp"),
    ],
)
async def test_an_unauthenticated_request_is_refused_before_its_body_is_sent(
    ingress_settings: IngressSettings, credentials: dict[str, str]
) -> None:
    async with _running(ingress_settings) as client:
        reader, writer = stream = await _connect(client)
        try:
            # 900 kB announced, not one byte sent: the 401 cannot have waited for them.
            headers = {"Content-Type": "application/json", "Content-Length": "900000"}
            writer.write(_head(headers | credentials))
            status, response_headers, payload = await _response(reader)
        finally:
            await _close(stream)
        assert status == 401, payload
        _assert_problem(status, response_headers, payload, "unauthorized")
        await _assert_still_serving(client)


# -- bytes of body in flight ----------------------------------------------------------------------


async def test_bodies_past_the_in_flight_budget_get_503(
    ingress_settings: IngressSettings,
) -> None:
    declared = 200_000
    async with _running(ingress_settings, max_inflight_body_bytes=300_000) as client:
        await _assert_still_serving(client)
        # Two senders that look signed announce 200 kB each and stall after a few bytes:
        # the budget holds one of them, the other is refused while both still hold on.
        stalled = [await _connect(client) for _ in range(2)]
        try:
            for _, writer in stalled:
                credentials = {
                    SIGNATURE_HEADER: "0" * 64,
                    TIMESTAMP_HEADER: str(int(time.time())),
                    "Content-Type": "application/json",
                    "Content-Length": str(declared),
                }
                writer.write(_head(credentials) + b'{"message": ')
                await writer.drain()
            answers = [asyncio.create_task(_response(reader)) for reader, _ in stalled]
            done, pending = await asyncio.wait(
                answers, timeout=CLOSED_WITHIN, return_when=asyncio.FIRST_COMPLETED
            )
            assert len(done) == 1, "no body was refused"
            assert len(pending) == 1, "both bodies were refused"
            status, headers, payload = done.pop().result()
            assert status == 503, payload
            _assert_problem(status, headers, payload, "busy")
            assert headers["retry-after"] == "1"
            assert await _gauge(client, "callstream_ingress_inflight_body_bytes") == declared
            pending.pop().cancel()
        finally:
            for stream in stalled:
                await _close(stream)
        await _served_again_on_a_new_connection(client)
        assert await _counted(client, "busy") >= 1
        # The stalled body's allowance is given back once the ingress sees its sender gone.
        deadline = time.monotonic() + CLOSED_WITHIN
        while await _gauge(client, "callstream_ingress_inflight_body_bytes") != 0:
            assert time.monotonic() < deadline, "a stalled body's bytes were never given back"
            await asyncio.sleep(0.2)
