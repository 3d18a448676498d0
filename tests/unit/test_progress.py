"""callstream.progress in a log: plain lines, at most every interval or every tenth, and the
last one at the end; a fixed-length run (the soak) counts its time."""

from __future__ import annotations

import asyncio
import io
import os
import pty
import re
import subprocess
import sys

from callstream.progress import over_time, per_time, track
from tests.support.cli import REPO


def test_a_log_gets_a_line_at_the_start_each_tenth_and_not_in_between() -> None:
    log = io.StringIO()
    with track("replay storage", 1000, stream=log, interval=3600) as bar:
        for _ in range(1000):
            bar.advance()
    counts = [
        int(m) for m in re.findall(r"^replay storage: (\d+)/1000 records", log.getvalue(), re.M)
    ]
    assert counts == [1, *range(100, 1001, 100)]
    assert "\r" not in log.getvalue()


def test_the_last_line_is_written_even_between_intervals() -> None:
    log = io.StringIO()
    bar = track("re-publish", 10, stream=log, interval=3600)
    bar.update(1)
    bar.update(5)  # inside the interval, but a new tenth: a line
    bar.finish(7)
    bar.finish(9)  # finishing twice changes nothing
    lines = log.getvalue().splitlines()
    assert [line.split(":")[1].split()[0] for line in lines] == ["1/10", "5/10", "7/10"]
    assert lines[-1].startswith("re-publish: 7/10 records (70%)")


def test_a_note_names_the_step_and_slow_rates_read_per_minute() -> None:
    log = io.StringIO()
    bar = track("bench", 5, unit="phases", stream=log, interval=0.0)
    bar.describe("catch-up")
    assert log.getvalue() == "bench (catch-up): 0/5 phases (0%), 0/s, ? left\n"
    assert per_time(0.05) == "3.0/min"
    assert per_time(1234.4) == "1234/s"


async def test_a_run_of_fixed_length_counts_its_time() -> None:
    log = io.StringIO()
    async with over_time("soak load", 0.4, stream=log, interval=0.05):
        await asyncio.sleep(1.0)
    last = log.getvalue().splitlines()[-1]
    assert last == "soak load: 0s of 0s (100%), 0s left"
    assert "\r" not in log.getvalue()


def test_timed_lines_show_durations() -> None:
    log = io.StringIO()
    bar = track("soak load", 600, unit="s", stream=log, interval=0.0, timed=True)
    bar.update(90)
    assert log.getvalue() == "soak load: 1m30s of 10m00s (15%), 8m30s left\n"


_ON_A_TERMINAL = """
import logging, time
from callstream.progress import track
from core.logs import configure
configure("INFO", service="test")
with track("copy", 4) as bar:
    bar.advance(2)
    time.sleep(0.6)
    logging.getLogger("callstream.test").info("half way")
    time.sleep(0.6)
    bar.advance(2)
"""


def test_a_log_line_written_while_the_bar_is_up_gets_a_line_of_its_own() -> None:
    terminal, child_side = pty.openpty()
    env = os.environ | {"TERM": "xterm"}
    with subprocess.Popen(
        [sys.executable, "-c", _ON_A_TERMINAL], stderr=child_side, env=env, cwd=REPO
    ) as child:
        os.close(child_side)
        screen = _read_until_closed(terminal)
        assert child.wait(30) == 0
    os.close(terminal)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode())
    pieces = [piece.strip() for piece in re.split(r"[\r\n]", text) if piece.strip()]
    logged = [piece for piece in pieces if '"half way"' in piece]
    assert logged, text
    assert all(piece.startswith('{"ts"') for piece in logged), logged
    assert "━" in text


def _read_until_closed(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed its side
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
