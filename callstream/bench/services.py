"""The bench's child processes and what they cost (spawn, stop, sample, account CPU), and
reading what a phase measured (wrk's summary, stored rows, histogram buckets)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from callstream.bench.procstat import Watched, cpu_seconds, machine_busy_seconds
from callstream.bench.report import OTHERS, ProcessUsage
from callstream.processes import ChildProcess

HOST = "127.0.0.1"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Service(ChildProcess):
    """A long-running child (a server, a consumer) serving HTTP on `port`, with its log in the
    bench's temp dir, which is also its working directory."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str],
        log: Path,
        port: int,
        *,
        tree: bool = False,
    ):
        super().__init__(argv, env=env, log_file=log, cwd=log.parent, name=name)
        self.port = port
        # Its CPU is its whole process tree's: a parent and its workers.
        self.tree = tree

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def watched(self) -> Watched:
        return Watched(self.name, self.pid, tree=self.tree)


@dataclass(frozen=True, slots=True)
class Measured:
    output: str
    cpu_seconds: float
    peak_rss_kib: int
    exit_code: int


def run_measured(argv: list[str]) -> Measured:
    """Run to completion (blocking); wait4 gives the child's own CPU time and peak RSS."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    return Measured(
        output.decode(errors="replace"),
        usage.ru_utime + usage.ru_stime,
        usage.ru_maxrss,
        proc.returncode,
    )


def py_spy_record(py_spy: str, pid: int, seconds: int, out: Path) -> ChildProcess:
    """Collapsed stacks, per function, sampled without pausing the target. Stop it with
    SIGINT: py-spy writes its output when interrupted (or when its duration ends)."""
    argv = [py_spy, "record", "--pid", str(pid), "--rate", "250", "--duration", str(seconds)]
    argv += ["--format", "raw", "--function", "--nonblocking", "--output", str(out)]
    return ChildProcess(argv, log_file=Path(os.devnull), name="py-spy").start()


class CpuWindow:
    """CPU seconds of the watched processes over one measured window, and what every other
    process on the machine used meanwhile (other work on a 2-core box skews a run)."""

    def __init__(self, watched: Sequence[Watched]) -> None:
        self._watched = list(watched)
        self._before = {w.name: w.cpu() for w in self._watched}
        self._busy = machine_busy_seconds()
        self._bench = cpu_seconds(os.getpid())
        self._started = time.monotonic()
        self._after: dict[str, float] = {}
        self._peak_rss: dict[str, int | None] = {}
        self._busy_delta = 0.0
        self._bench_delta = 0.0
        self.seconds = 0.0

    def close(self) -> None:
        """End the window; call it while the watched processes still run."""
        self._after = {w.name: w.cpu() for w in self._watched}
        self._peak_rss = {w.name: w.peak_rss_kib() for w in self._watched}
        self._busy_delta = machine_busy_seconds() - self._busy
        self._bench_delta = cpu_seconds(os.getpid()) - self._bench
        self.seconds = time.monotonic() - self._started

    def usage(
        self, reports: int, generators: Sequence[tuple[str, Measured]] = ()
    ) -> list[ProcessUsage]:
        # (name, CPU seconds, peak RSS KiB): the watched processes, then the load generators.
        measured = [
            (w.name, self._after[w.name] - self._before[w.name], self._peak_rss[w.name])
            for w in self._watched
        ] + [(name, run.cpu_seconds, run.peak_rss_kib) for name, run in generators]
        out = [
            ProcessUsage(
                name,
                round(cpu, 3),
                round(cpu * 1000 / reports, 3) if reports else None,
                round(rss_kib / 1024, 1) if rss_kib is not None else None,
            )
            for name, cpu, rss_kib in measured
        ]
        # Load generators run inside the window, so their CPU is in the machine's total too.
        ours = sum((cpu for _, cpu, _ in measured), self._bench_delta)
        out.append(ProcessUsage(OTHERS, round(max(0.0, self._busy_delta - ours), 2), None, None))
        return out


class Sampler:
    """Reads a cumulative counter every `interval` seconds while the block runs."""

    def __init__(self, read: Callable[[], Awaitable[float | None]], interval: float = 1.0):
        self._read = read
        self._interval = interval
        self.points: list[tuple[float, float]] = []  # (epoch seconds, counter)
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        with contextlib.suppress(aiohttp.ClientError, OSError, ValueError):
            value = await self._read()
            if value is not None:
                self.points.append((time.time(), value))

    async def _loop(self) -> None:
        next_at = time.monotonic()
        while True:
            await self._sample()
            next_at += self._interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def __aenter__(self) -> Sampler:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._sample()

    def rates(self, origin: float) -> list[tuple[float, float]]:
        return [
            (round(t1 - origin, 2), round((v1 - v0) / (t1 - t0), 1))
            for (t0, v0), (t1, v1) in itertools.pairwise(self.points)
            # The last interval, cut short when the block ends, would only add noise.
            if t1 - t0 >= self._interval / 2
        ]

    def delta(self) -> float | None:
        return self.points[-1][1] - self.points[0][1] if len(self.points) >= 2 else None


def wrk_summary(run: Measured) -> dict[str, Any]:
    line = next((x for x in run.output.splitlines() if x.startswith("CALLSTREAM_WRK ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary (exit {run.exit_code}):\n{run.output}")
    data: dict[str, Any] = orjson.loads(line.split(" ", 1)[1])
    return data


def stored_times(db: Path) -> dict[str, float]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT call_id, stored_at FROM call_reports").fetchall()
    return {call_id: datetime.fromisoformat(stamp).timestamp() for call_id, stamp in rows}


def sqlite_count(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return int(conn.execute("SELECT count(*) FROM call_reports").fetchone()[0])


async def postgres_count(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM call_reports"))
    finally:
        await conn.close()


def bucket_quantiles(
    before: Mapping[float, float], after: Mapping[float, float]
) -> dict[str, float]:
    """Upper bounds (ms) of the buckets holding p50, p90 and p99 of what a histogram
    observed between two scrapes."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    out: dict[str, float] = {}
    for q in (50, 90, 99):
        bound = next((b for b, c in zip(bounds, counts, strict=True) if c >= total * q / 100), None)
        out[f"p{q}_at_most_ms"] = math.nan if bound is None or not total else bound * 1000
    return out


def smooth(series: list[tuple[float, float]], window: float) -> list[tuple[float, float]]:
    """Rates averaged over at least `window` seconds: 0.1 s polls are too jumpy to plot."""
    out: list[tuple[float, float]] = []
    bucket: list[float] = []
    start: float | None = None
    for t, rate in series:
        start = t if start is None else start
        bucket.append(rate)
        if t - start >= window:
            out.append((round(t, 2), round(sum(bucket) / len(bucket), 1)))
            bucket, start = [], None
    return out
