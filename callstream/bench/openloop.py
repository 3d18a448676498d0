"""A fixed-arrival-rate (open-loop) HTTP/1.1 load generator, free of coordinated omission.

wrk2 is not packaged here and wrk is closed-loop: each connection waits for its response
before sending again, so a slow server is offered less load and the slow moments are
measured once instead of for every request that should have been sent during them.
This client sends request i at t0 + i/rate whatever happened to earlier requests, and
measures each latency from that *scheduled* time: a request that had to wait for a free
connection, or was sent late because the client fell behind, carries the wait.

Requests come pre-signed from a pool file (see callstream.bench.pool), one per scheduled
send. Connections are kept alive and reused; a request scheduled while every connection
is busy opens another (up to --max-connections) or waits in a queue for the first to free.

Run as ``python -m callstream.bench.openloop POOL OUT --rate R --port P``; OUT gets JSON:
per-request scheduled, sent and done times (seconds after t0) and the HTTP status (0 for
no answer).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import time
from array import array
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import orjson

from callstream.bench.pool import read_pool_file
from callstream.bench.report import FixedRateRun, Latency, SecondStats, percentile

_HEADER_END = b"\r\n\r\n"
_CONTENT_LENGTH = b"\r\ncontent-length:"


class _Connection(asyncio.Protocol):
    _transport: asyncio.Transport  # from connection_made, before anything else is called

    def __init__(self, client: _OpenLoop) -> None:
        self._client = client
        self._buf = bytearray()
        self._need: int | None = None
        self._status = 0
        self._close_after = False
        self.current: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self._transport = cast(asyncio.Transport, transport)
        self._client.connected(self)

    def send(self, index: int) -> None:
        self.current = index
        self._client.sent[index] = time.perf_counter()
        self._transport.write(self._client.requests[index])

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._need is None:
            end = self._buf.find(_HEADER_END)
            if end < 0:
                return
            head = bytes(self._buf[:end]).lower()
            at = head.find(_CONTENT_LENGTH)
            if at < 0 or not head.startswith(b"http/1."):
                # Chunked or garbled: this client only reads what aiohttp sends back.
                self.close()
                return
            line_end = head.find(b"\r\n", at + 2)
            length = int(head[at + len(_CONTENT_LENGTH) : line_end if line_end >= 0 else None])
            self._status = int(head[9:12])
            self._close_after = b"\r\nconnection: close" in head
            self._need = end + len(_HEADER_END) + length
        if len(self._buf) < self._need:
            return
        index, self.current = self.current, None
        del self._buf[: self._need]
        self._need = None
        if index is not None:
            self._client.completed(index, self._status)
        if self._close_after:
            self.close()
        else:
            self._client.connected(self)

    def close(self) -> None:
        self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._client.lost(self, self.current)
        self.current = None


class _OpenLoop:
    def __init__(self, requests: list[bytes], host: str, port: int, max_connections: int) -> None:
        n = len(requests)
        self.requests = requests
        self.sched = array("d", [math.nan]) * n
        self.sent = array("d", [math.nan]) * n
        self.done = array("d", [math.nan]) * n
        self.status = array("h", [0]) * n
        self._host = host
        self._port = port
        self._max = max_connections
        self._idle: list[_Connection] = []
        self._waiting: deque[int] = deque()
        self._open = 0  # open or opening
        self._outstanding = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._all_done = asyncio.Event()
        self._dispatched_all = False
        self.connections_opened = 0
        self.connect_errors = 0

    def _grow(self) -> None:
        self._open += 1
        task = asyncio.get_running_loop().create_task(self._connect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: _Connection(self), self._host, self._port)
            self.connections_opened += 1
        except OSError:
            self._open -= 1
            self.connect_errors += 1
            if self._open == 0 and self._waiting:
                await asyncio.sleep(0.05)
                self._grow()

    def connected(self, conn: _Connection) -> None:
        """`conn` is free: give it the oldest waiting request, or keep it idle."""
        if self._waiting:
            conn.send(self._waiting.popleft())
        else:
            self._idle.append(conn)

    def lost(self, conn: _Connection, current: int | None) -> None:
        self._open -= 1
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)
        if current is not None:
            self.completed(current, 0)
        if self._waiting and self._open < self._max:
            self._grow()

    def dispatch(self, index: int, scheduled: float) -> None:
        self.sched[index] = scheduled
        self._outstanding += 1
        if self._idle:
            self._idle.pop().send(index)
            return
        self._waiting.append(index)
        if self._open < self._max:
            self._grow()

    def completed(self, index: int, status: int) -> None:
        self.done[index] = time.perf_counter()
        self.status[index] = status
        self._outstanding -= 1
        if self._dispatched_all and self._outstanding == 0:
            self._all_done.set()

    async def run(self, rate: float, warm_connections: int, drain_timeout: float) -> float:
        """Send every request on schedule; returns t0 (perf_counter) of the schedule."""
        for _ in range(min(warm_connections, self._max)):
            self._grow()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10.0)
        n = len(self.requests)
        t0 = time.perf_counter() + 0.05
        i = 0
        while i < n:
            now = time.perf_counter()
            # Everything due by now goes out at once (a late wake-up sends a burst, and
            # those requests keep their scheduled times).
            due = min(n, math.floor((now - t0) * rate) + 1) if now >= t0 else 0
            while i < due:
                self.dispatch(i, t0 + i / rate)
                i += 1
            if i < n:
                await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        self._dispatched_all = True
        if self._outstanding == 0:
            self._all_done.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_done.wait(), drain_timeout)
        return t0

    def close(self) -> None:
        for conn in list(self._idle):
            conn.close()


async def _main(args: argparse.Namespace) -> None:
    requests = read_pool_file(args.pool)
    client = _OpenLoop(requests, args.host, args.port, args.max_connections)
    wall = time.time() - time.perf_counter()  # perf_counter -> epoch seconds
    t0 = await client.run(args.rate, args.warm_connections, args.drain_timeout)
    client.close()

    def rel(values: array[float]) -> list[float | None]:
        return [None if math.isnan(v) else round(v - t0, 6) for v in values]

    args.out.write_bytes(
        orjson.dumps(
            {
                "rate": args.rate,
                "t0_epoch": t0 + wall,
                "scheduled": rel(client.sched),
                "sent": rel(client.sent),
                "done": rel(client.done),
                "status": list(client.status),
                "connections_opened": client.connections_opened,
                "connect_errors": client.connect_errors,
            }
        )
    )


def summarise(
    data: Mapping[str, Any],
    call_ids: Sequence[str],
    bodies: Sequence[str],
    stored: Mapping[str, float],
    *,
    offered: float,
    duration: float,
    mix: str,
) -> FixedRateRun:
    """Figures from the client's output. `bodies` names each request's body; `stored` maps
    call id to its row's stored_at."""
    t0 = float(data["t0_epoch"])
    scheduled: list[float] = data["scheduled"]
    sent: list[float | None] = data["sent"]
    done: list[float | None] = data["done"]
    status: list[int] = data["status"]
    latencies: list[float] = []  # from the scheduled time; inf for no 2xx answer
    service: list[float] = []  # from the actual send
    e2e: list[float | None] = []
    for i, call_id in enumerate(call_ids):
        finished, went = done[i], sent[i]
        if 200 <= status[i] < 300 and finished is not None and went is not None:
            latencies.append(finished - scheduled[i])
            service.append(finished - went)
            at = stored.get(call_id)
            e2e.append(None if at is None else at - (t0 + went))
        else:
            latencies.append(math.inf)
            e2e.append(None)
    by_second: dict[int, list[int]] = {}
    for i, at in enumerate(scheduled):
        by_second.setdefault(int(at), []).append(i)
    per_second = []
    for second, indexes in sorted(by_second.items()):
        lat = sorted(latencies[i] for i in indexes)
        ends = sorted(v for i in indexes if (v := e2e[i]) is not None)
        per_second.append(
            SecondStats(
                t=second + 0.5,
                sent=len(indexes),
                ok=sum(1 for v in lat if math.isfinite(v)),
                p50_ms=percentile(lat, 50) * 1000,
                p99_ms=percentile(lat, 99) * 1000,
                max_ms=lat[-1] * 1000,
                e2e_p50_ms=percentile(ends, 50) * 1000 if ends else math.nan,
                e2e_p99_ms=percentile(ends, 99) * 1000 if ends else math.nan,
            )
        )
    by_body: dict[str, list[float]] = {}
    for body, latency in zip(bodies, latencies, strict=True):
        by_body.setdefault(body, []).append(latency)
    ok = len(service)
    matched = [v for v in e2e if v is not None]
    last_done = max((d for d in done if d is not None), default=duration)
    return FixedRateRun(
        generator="callstream.bench.openloop (asyncio + uvloop, open loop)",
        offered_per_s=offered,
        duration_s=duration,
        body_mix=mix,
        scheduled=len(call_ids),
        ok=ok,
        failed=len(call_ids) - ok,
        achieved_per_s=round(ok / max(last_done, 1e-9), 1),
        latency=Latency.of_seconds(latencies),
        latency_by_body={
            f"of which {body}": Latency.of_seconds(values) for body, values in by_body.items()
        }
        if len(by_body) > 1
        else {},
        service=Latency.of_seconds(service),
        e2e=Latency.of_seconds(matched) if matched else None,
        e2e_matched=len(matched),
        storage_write_mean_ms=None,
        processes=[],
        per_second=per_second,
        stored_series=[],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m callstream.bench.openloop")
    parser.add_argument("pool", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-connections", type=int, default=512)
    parser.add_argument("--warm-connections", type=int, default=32)
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    try:
        # uvloop has no Windows build (pyproject installs it only elsewhere): optional here.
        import uvloop

        uvloop.run(_main(args))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
