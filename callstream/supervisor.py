"""`callstream run`: the ingress and every registered consumer (built-in or from an
installed package) as child processes.

Each child is the same process a deployment would run on its own (`callstream ingress`,
`callstream consumer NAME`), so local runs exercise the real service boundaries. A child
that dies is restarted with backoff, unless it exited with 2 (a setting missing or wrong,
which no restart can mend: it said which on its way out); SIGINT/SIGTERM stops them all.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import FrameType

from callstream.processes import ChildProcess, callstream_argv
from consumers.catalog import registered

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 20.0
# Every callstream command's exit code for a setting or argument it cannot use.
CONFIGURATION_ERROR = 2


@dataclass
class Child:
    process: ChildProcess
    started: bool = False
    restarts: int = 0
    next_start: float = 0.0
    given_up: bool = False


def services(*, with_consumers: bool) -> list[tuple[str, list[str]]]:
    """Each child's name and `callstream` arguments: the ingress, then every consumer."""
    found = [("ingress", ["ingress"])]
    if with_consumers:
        found += [(name, ["consumer", name]) for name in registered()]
    return found


def run_pipeline(env: Mapping[str, str], *, with_consumers: bool) -> int:
    children = [
        Child(ChildProcess(callstream_argv(*args), env=env, name=name))
        for name, args in services(with_consumers=with_consumers)
    ]
    stopping = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    log.info("pipeline: starting %s", ", ".join(c.process.name for c in children))
    supervise(children, lambda: stopping)
    return 0


def supervise(children: list[Child], stopping: Callable[[], bool]) -> None:
    """Keep the children running until `stopping()`, then stop them all."""
    try:
        while not stopping():
            now = time.monotonic()
            for child in children:
                if child.given_up:
                    continue
                code = child.process.poll()
                if child.started and code == CONFIGURATION_ERROR:
                    child.given_up = True
                    log.error(
                        "%s cannot start with these settings (its line above says why); not"
                        " restarted: set what it needs and run again",
                        child.process.name,
                    )
                    continue
                if child.started and code is not None:
                    child.restarts += 1
                    delay = min(2 ** min(child.restarts, 5), 30)
                    log.warning(
                        "%s exited with %s; restarting in %ss", child.process.name, code, delay
                    )
                    child.started = False
                    child.next_start = now + delay
                if not child.started and now >= child.next_start:
                    child.process.start()
                    child.started = True
            time.sleep(0.2)
    finally:
        _stop_all([c.process for c in children])


def _stop_all(children: list[ChildProcess]) -> None:
    running = [c for c in children if c.running()]
    for child in running:
        child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for child in running:
        child.wait_or_kill(deadline - time.monotonic())
