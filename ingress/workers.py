"""CALLSTREAM_INGRESS_WORKERS=N above 1: N ingress processes on one port.

The parent starts N workers (the command says how: `worker_argv(i)`), each a whole ingress
bound with SO_REUSEPORT, so the kernel spreads connections over them, each with its own
Kafka producer and its own spool directory <spool dir>/worker-<i> (a worker also drains the
directories nobody owns: ingress/takeover.py). The parent forwards SIGTERM and SIGINT (each
worker then shuts down gracefully), restarts a worker that dies, but not one whose first start
exits 2 (a setting it cannot use, which no restart mends; a worker that exits 2 later, say
for a file gone missing, is restarted like any other), and exits once every worker has
stopped. A worker stops by itself when this process dies (ingress/server.py).

Metrics: the workers run prometheus_client's multiprocess mode in a directory the parent
makes fresh for them (PROMETHEUS_MULTIPROC_DIR, in their environment only), so whichever
worker answers a scrape reports all of them; the parent marks each exited worker dead there.

Replays: the workers share one memory of recent deliveries (ingress/sharedreplays.py), a
file the parent creates before the first worker starts and removes at exit, its path in
their environment only (CALLSTREAM_INGRESS_REPLAY_TABLE), so a replayed signed request is
answered once for the whole ingress, whichever worker each copy lands on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from ingress.server import SHUTDOWN_GRACE_SECONDS, WorkerLink
from ingress.settings import IngressSettings
from ingress.sharedreplays import create_table
from ingress.takeover import worker_dir

log = logging.getLogger(__name__)

# Every callstream command's exit code for a setting or argument it cannot use.
CONFIGURATION_ERROR = 2
# A worker finishes its requests (SHUTDOWN_GRACE_SECONDS), then flushes its producer.
STOP_GRACE_SECONDS = SHUTDOWN_GRACE_SECONDS + 15.0
POLL_SECONDS = 0.2
# A setting a worker cannot use stops it while it starts; an exit 2 after this long is a
# fault of the moment (a file gone, a disk error), which a restart may mend.
SETTLING_SECONDS = 30.0


def worker_settings(settings: IngressSettings, index: int) -> IngressSettings:
    """Worker `index`'s settings: its own spool directory under the configured one."""
    root = settings.spool_dir
    return dataclasses.replace(
        settings, workers=1, spool_dir=None if root is None else worker_dir(root, index)
    )


@dataclass
class Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: float = 0.0
    next_start: float = 0.0
    given_up: bool = False


def run_workers(count: int, worker_argv: Callable[[int], list[str]], env: Mapping[str, str]) -> int:
    """Run `count` workers until SIGTERM/SIGINT; 0, or 2 when every worker exited with 2."""
    metrics_dir = Path(tempfile.mkdtemp(prefix="callstream-ingress-metrics-"))
    fd, name = tempfile.mkstemp(prefix="callstream-ingress-replays-")
    os.close(fd)
    replay_table = Path(name)
    create_table(replay_table)
    child_env = dict(env) | WorkerLink(metrics_dir, replay_table, os.getpid()).env()
    stopping = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    workers = [Worker(i) for i in range(count)]
    log.info("ingress: starting %d workers", count)
    try:
        while not stopping and not all(w.given_up for w in workers):
            for worker in workers:
                _tend(worker, worker_argv, child_env, metrics_dir)
            time.sleep(POLL_SECONDS)
    finally:
        _stop_all(workers, metrics_dir)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        replay_table.unlink(missing_ok=True)
    return CONFIGURATION_ERROR if all(w.given_up for w in workers) else 0


def _tend(
    worker: Worker,
    worker_argv: Callable[[int], list[str]],
    env: Mapping[str, str],
    metrics_dir: Path,
) -> None:
    if worker.given_up:
        return
    now = time.monotonic()
    if worker.process is not None:
        code = worker.process.poll()
        if code is None:
            return
        _mark_dead(worker.process.pid, metrics_dir)
        worker.process = None
        first_start = worker.restarts == 0 and now - worker.started < SETTLING_SECONDS
        if code == CONFIGURATION_ERROR and first_start:
            worker.given_up = True
            log.error(
                "ingress worker %d cannot start with these settings (its line above says why);"
                " not restarted",
                worker.index,
            )
            return
        worker.restarts += 1
        delay = min(2 ** min(worker.restarts, 5), 30)
        log.warning(
            "ingress worker %d exited with %s; restarting in %ss", worker.index, code, delay
        )
        worker.next_start = now + delay
    if now >= worker.next_start:
        worker.process = subprocess.Popen(worker_argv(worker.index), env=env)
        worker.started = now


def _stop_all(workers: list[Worker], metrics_dir: Path) -> None:
    running = [w.process for w in workers if w.process is not None]
    for process in running:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in running:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("ingress worker %d did not stop in time; killing it", process.pid)
            process.kill()
            process.wait()
        _mark_dead(process.pid, metrics_dir)


def _mark_dead(pid: int, metrics_dir: Path) -> None:
    """A gone worker's live* gauges leave the sums (its counters stay counted)."""
    mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]
