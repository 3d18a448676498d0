"""How far a long command got: a bar on a terminal, plain lines in a log.

A command says only how much there is, how far it got, and that it is done:

    with track("re-drive storage", total, unit="dead letters", stream=err) as bar:
        ...
        bar.advance(len(batch))

When `stream` is a terminal that is a rich bar (count, rate, time left), redrawn in place.
Otherwise (a log file, journald, a pipe, a test's StringIO) it is a plain line at most every
`interval` seconds or whenever another tenth of the total is done, and one last line at the
end: never a carriage return, so a log keeps one readable line per report.

rich rather than tqdm: rich ships its own type information (mypy --strict needs no stubs
package), and its bar redraws from its own thread, so the elapsed time and the time left keep
moving while a command waits on Kafka between two advances.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Self, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.text import Text

# A log gets a line this often (seconds), and whenever another tenth of the total is done.
LOG_INTERVAL = 10.0
_STEPS = 10


class Progress:
    """Counts toward `total` and shows it; `finish()` (or leaving the `with`) ends the display."""

    def __init__(self, label: str, total: float, unit: str) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.done: float = 0
        self.note = ""
        self._finished = False

    def advance(self, amount: float = 1) -> None:
        self.update(self.done + amount)

    def update(self, done: float) -> None:
        """`done` so far (an absolute count, for commands that poll where they are)."""
        self.done = done
        self._show(final=False)

    def describe(self, note: str) -> None:
        """What it is doing now (a bench phase, say), shown after the label."""
        self.note = note
        self._show(final=False)

    def finish(self, done: float | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        if done is not None:
            self.done = done
        self._show(final=True)

    def _show(self, *, final: bool) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


def track(
    label: str,
    total: float,
    *,
    unit: str = "records",
    stream: TextIO | None = None,
    interval: float = LOG_INTERVAL,
    timed: bool = False,
) -> Progress:
    """A bar when `stream` (default: stderr) is a terminal, plain lines otherwise.

    `timed`: the total and the count are seconds (a run of fixed length), shown as durations.
    """
    stream = stream if stream is not None else sys.stderr
    if _is_terminal(stream):
        return _Bar(label, total, unit, stream, timed=timed)
    return _Lines(label, total, unit, stream, interval, timed=timed)


@contextlib.asynccontextmanager
async def over_time(
    label: str, seconds: float, *, stream: TextIO | None = None, interval: float = LOG_INTERVAL
) -> AsyncIterator[Progress]:
    """Progress of something that runs for `seconds` (a soak's load): the clock advances it."""
    bar = track(label, seconds, unit="s", stream=stream, interval=interval, timed=True)
    began = time.monotonic()

    async def tick() -> None:
        while True:
            await asyncio.sleep(min(1.0, max(interval, 0.05)))
            bar.update(min(time.monotonic() - began, seconds))

    ticker = asyncio.create_task(tick(), name=f"progress-{label}")
    try:
        yield bar
    finally:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)
        bar.finish(min(time.monotonic() - began, seconds))


def _is_terminal(stream: TextIO) -> bool:
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or already closed
        return False


# -- plain lines ---------------------------------------------------------------------------


class _Lines(Progress):
    def __init__(
        self, label: str, total: float, unit: str, stream: TextIO, interval: float, *, timed: bool
    ) -> None:
        super().__init__(label, total, unit)
        self._stream = stream
        self._interval = interval
        self._timed = timed
        self._started = time.monotonic()
        self._last: float | None = None
        self._shown: float | None = None
        self._step = 0

    def _show(self, *, final: bool) -> None:
        now = time.monotonic()
        step = int(_STEPS * self.done / self.total) if self.total > 0 else _STEPS
        if final:
            if self.done == self._shown:
                return
        elif step <= self._step and self._last is not None and now - self._last < self._interval:
            return
        self._last, self._shown, self._step = now, self.done, max(step, self._step)
        self._stream.write(self._line(now - self._started) + "\n")
        self._stream.flush()

    def _line(self, elapsed: float) -> str:
        done, total = self.done, self.total
        percent = 100.0 * done / total if total > 0 else 100.0
        head = f"{self.label} ({self.note})" if self.note else self.label
        if self._timed:
            left = duration(max(total - done, 0))
            return f"{head}: {duration(done)} of {duration(total)} ({percent:.0f}%), {left} left"
        rate = done / max(elapsed, 1e-9)
        left = duration(max(total - done, 0) / rate) if rate > 0 else "?"
        return (
            f"{head}: {done:.0f}/{total:.0f} {self.unit} ({percent:.0f}%), "
            f"{per_time(rate)}, {left} left"
        )


def per_time(rate: float) -> str:
    """Per second, or per minute for slow things (bench phases) that would read "0/s"."""
    return f"{rate:.0f}/s" if rate >= 1 or rate == 0 else f"{rate * 60:.1f}/min"


def duration(seconds: float) -> str:
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


# -- the bar -------------------------------------------------------------------------------


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else per_time(speed))


class _Bar(Progress):
    def __init__(self, label: str, total: float, unit: str, stream: TextIO, *, timed: bool) -> None:
        super().__init__(label, total, unit)
        # Lines the command itself prints while the bar is up (the bench's and the soak's
        # running commentary) go above the bar rather than through it.
        redirect = stream is sys.stderr or stream is sys.stdout
        counts: list[ProgressColumn] = (
            [TimeElapsedColumn(), TextColumn(f"of {duration(total)}")]
            if timed
            else [MofNCompleteColumn(), TextColumn(unit), _Rate()]
        )
        self._rich = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            *counts,
            TimeRemainingColumn(),
            console=Console(file=stream, force_terminal=True),
            redirect_stdout=redirect,
            redirect_stderr=redirect,
            refresh_per_second=4,
        )
        self._task = self._rich.add_task(label, total=total)
        self._rich.start()
        # The log handler (core.logs) holds the stderr of start-up, which rich's redirection
        # does not reach: without this a log line would be glued to the end of the bar.
        self._stream = stream
        self._handlers = [
            h
            for h in logging.getLogger().handlers
            if redirect and isinstance(h, logging.StreamHandler) and h.stream is stream
        ]
        above = _AboveTheBar(self._rich.console)
        for handler in self._handlers:
            handler.setStream(above)

    def _show(self, *, final: bool) -> None:
        description = f"{self.label} ({self.note})" if self.note else self.label
        self._rich.update(self._task, completed=self.done, description=description)
        if final:
            self._rich.stop()
            for handler in self._handlers:
                handler.setStream(self._stream)


class _AboveTheBar:
    """The log handler's stream while a bar is up: each line printed above the bar, whole
    (rich's own redirection wraps at the terminal's width, which would break a JSON line)."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._pending = ""

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            self._console.out(line, highlight=False)
        return len(text)

    def flush(self) -> None:
        pass
