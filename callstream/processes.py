"""A child process of the command: the supervisor's services, the bench's and the soak's
processes under test, and the tests' own. Started with an environment and, optionally, a log
file; stopped with SIGTERM and, after a grace period, SIGKILL."""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

log = logging.getLogger(__name__)


def callstream_argv(*args: str) -> list[str]:
    """`python -m callstream ARGS...` with this interpreter: the command as a deployment runs it."""
    return [sys.executable, "-m", "callstream", *args]


class ChildProcess:
    """One child process. Without a log file it shares this process's stdin, stdout and stderr;
    with one, its stdout and stderr are appended to the file and its stdin is empty."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_file: Path | None = None,
        cwd: Path | None = None,
        name: str | None = None,
        new_session: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.env = None if env is None else dict(env)
        self.log_file = log_file
        self.cwd = cwd
        self.name = name or Path(self.argv[0]).name
        # A session of its own: a terminal's Ctrl-C (or a test run's) does not reach it.
        self.new_session = new_session
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        with contextlib.ExitStack() as stack:
            out = None if self.log_file is None else stack.enter_context(self.log_file.open("ab"))
            stdin = None if out is None else subprocess.DEVNULL
            stderr = None if out is None else subprocess.STDOUT
            self._popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=stdin,
                stdout=out,
                stderr=stderr,
                start_new_session=self.new_session,
            )
        return self

    @property
    def popen(self) -> subprocess.Popen[bytes]:
        assert self._popen is not None, f"{self.name} was never started"
        return self._popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        """The exit status once it has exited, else None (also before it is started)."""
        return None if self._popen is None else self._popen.poll()

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def send_signal(self, sig: int) -> None:
        if self.running():
            self.popen.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        """Its exit status; raises subprocess.TimeoutExpired after `timeout` seconds."""
        return self.popen.wait(timeout)

    def kill(self) -> int:
        self.send_signal(signal.SIGKILL)
        return self.popen.wait()

    def wait_or_kill(self, grace: float) -> int:
        try:
            return self.popen.wait(max(0.1, grace))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", self.name)
            return self.kill()

    def stop(self, grace: float = 20.0, sig: int = signal.SIGTERM) -> int | None:
        """`sig`, then SIGKILL after `grace` seconds; its exit status (None: never started)."""
        if self._popen is None:
            return None
        self.send_signal(sig)
        return self.wait_or_kill(grace)

    def log_tail(self, lines: int = 20) -> str:
        if self.log_file is None:
            return "(no log)"
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
