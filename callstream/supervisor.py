"""`callstream run`: the ingress and every registered consumer as child processes.

Each child is the same process a deployment would run on its own (`callstream ingress`,
`callstream consumer NAME`), so local runs exercise the real service boundaries. A child
that dies is restarted with backoff; SIGINT/SIGTERM stops them all.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 20.0


@dataclass
class _Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = field(default=0.0)


def run_pipeline(env: Mapping[str, str], *, with_consumers: bool) -> int:
    children = [_Child("ingress", [sys.executable, "-m", "callstream", "ingress"])]
    if with_consumers:
        from consumers.registry import CONSUMERS

        children += [
            _Child(name, [sys.executable, "-m", "callstream", "consumer", name])
            for name in CONSUMERS
        ]
    stopping = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    log.info("pipeline: starting %s", ", ".join(c.name for c in children))
    try:
        while not stopping:
            now = time.monotonic()
            for child in children:
                if child.process is not None and child.process.poll() is not None:
                    code = child.process.returncode
                    child.restarts += 1
                    delay = min(2 ** min(child.restarts, 5), 30)
                    log.warning("%s exited with %s; restarting in %ss", child.name, code, delay)
                    child.process = None
                    child.next_start = now + delay
                if child.process is None and now >= child.next_start:
                    child.process = subprocess.Popen(child.argv, env=dict(env))
            time.sleep(0.2)
    finally:
        _stop_all(children)
    return 0


def _stop_all(children: list[_Child]) -> None:
    running = [c for c in children if c.process is not None and c.process.poll() is None]
    for child in running:
        assert child.process is not None
        child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for child in running:
        assert child.process is not None
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", child.name)
            child.process.kill()
            child.process.wait()
