"""The parent of the ingress workers (ingress/workers.py) with real child processes: small
Python programs standing in for `callstream ingress --worker I`."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from ingress.replays import MAX_REMEMBERED
from ingress.server import MULTIPROC_ENV, PARENT_ENV
from ingress.sharedreplays import TABLE_ENV
from ingress.workers import run_workers


def program(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def run_workers_until_sigterm(
    seconds: float, count: int, argv: Callable[[int], list[str]], env: dict[str, str]
) -> int:
    """`run_workers`, with this process sent SIGTERM after `seconds` as an operator would."""
    stopper = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGTERM))
    stopper.start()
    try:
        return run_workers(count, argv, env)
    finally:
        stopper.cancel()


def test_workers_that_exit_2_are_not_restarted_and_the_parent_exits_2(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    code = f"open({str(starts)!r}, 'a').write('x'); raise SystemExit(2)"
    assert run_workers(2, lambda index: program(code), dict(os.environ)) == 2
    assert starts.read_text() == "xx"


def test_a_worker_that_dies_is_started_again_until_sigterm_stops_them_all(
    tmp_path: Path,
) -> None:
    """Oracle: worker 0 exits 1 at once and is started again (after its back-off); worker 1
    runs until the parent's SIGTERM reaches it, with the metrics directory and the replay
    table (made before it started, with room for every remembered delivery), which are gone
    once the parent returns 0."""
    crashes, served = tmp_path / "crashes", tmp_path / "served"
    crash = f"open({str(crashes)!r}, 'a').write('x'); raise SystemExit(1)"
    serve = (
        "import os, pathlib, signal, sys, time\n"
        "from ingress.sharedreplays import ReplayTable\n"
        f"table = os.environ[{TABLE_ENV!r}]\n"
        "capacity = ReplayTable(pathlib.Path(table), 1.0).capacity\n"
        f"open({str(served)!r}, 'a').write("
        f"' '.join([os.environ[{MULTIPROC_ENV!r}], table, str(capacity)]) + '\\n')\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        "time.sleep(60)\n"
    )
    code = run_workers_until_sigterm(
        6.0, 2, lambda index: program(crash if index == 0 else serve), {}
    )
    assert code == 0
    assert len(crashes.read_text()) >= 2  # started, died, started again
    [line] = served.read_text().splitlines()  # started once, never restarted
    metrics_dir, table, capacity = line.split()
    assert int(capacity) >= MAX_REMEMBERED
    assert metrics_dir.startswith(tempfile.gettempdir())
    assert not Path(metrics_dir).exists()
    assert table.startswith(tempfile.gettempdir())
    assert not Path(table).exists()


def test_a_worker_that_exits_2_after_it_ran_is_restarted(tmp_path: Path) -> None:
    """Oracle: a worker whose first start crashed (exit 1) and whose next starts exit 2 (a
    file gone missing, not a setting) is started again each time until SIGTERM; each start
    is told its parent's pid."""
    starts = tmp_path / "starts"
    code = (
        "import os, pathlib, sys\n"
        f"log = pathlib.Path({str(starts)!r})\n"
        "first = not log.exists()\n"
        f"told = int(os.environ[{PARENT_ENV!r}]) == os.getppid()\n"
        "log.open('a').write('t' if told else 'f')\n"
        "raise SystemExit(1 if first else 2)\n"
    )
    assert run_workers_until_sigterm(8.0, 1, lambda index: program(code), dict(os.environ)) == 0
    assert starts.read_text() in ("ttt", "tttt")  # at 0 s, after 2 s and after 4 s more
