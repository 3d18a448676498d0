"""The bench's child processes and what they cost: spawn, wait, stop, sample, account CPU."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from callstream.bench.procstat import Watched, cpu_seconds, machine_busy_seconds
from callstream.bench.report import OTHERS, ProcessUsage
from callstream.processes import ChildProcess

HOST = "127.0.0.1"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Service:
    """A long-running child (a server, a consumer) with its log in the bench's temp dir."""

    name: str
    process: ChildProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def watched(self) -> Watched:
        return Watched(self.name, self.process.pid)

    def stop(self, timeout: float = 20.0) -> None:
        self.process.stop(timeout)


def spawn(name: str, argv: list[str], env: Mapping[str, str], log: Path, port: int) -> Service:
    """Started with the log's directory as its working directory."""
    process = ChildProcess(argv, env=env, log_file=log, cwd=log.parent, name=name)
    return Service(name, process.start(), port)


@dataclass(frozen=True, slots=True)
class Measured:
    """A load generator run to completion: its output and what it cost."""

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


def py_spy_record(py_spy: str, pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    """Collapsed stacks, per function, sampled without pausing the target."""
    argv = [py_spy, "record", "--pid", str(pid), "--rate", "250", "--duration", str(seconds)]
    argv += ["--format", "raw", "--function", "--nonblocking", "--output", str(out)]
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


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
        out: list[ProcessUsage] = []
        ours = self._bench_delta
        for w in self._watched:
            cpu = self._after[w.name] - self._before[w.name]
            ours += cpu
            out.append(_usage(w.name, cpu, reports, self._peak_rss[w.name]))
        for name, run in generators:
            ours += run.cpu_seconds
            out.append(_usage(name, run.cpu_seconds, reports, run.peak_rss_kib))
        # Load generators run inside the window, so their CPU is in the machine's total too.
        others = max(0.0, self._busy_delta - ours)
        out.append(ProcessUsage(OTHERS, round(others, 2), None, None))
        return out


def _usage(name: str, cpu: float, reports: int, rss_kib: int | None) -> ProcessUsage:
    return ProcessUsage(
        name,
        round(cpu, 3),
        round(cpu * 1000 / reports, 3) if reports else None,
        round(rss_kib / 1024, 1) if rss_kib is not None else None,
    )


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
