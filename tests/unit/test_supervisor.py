"""`callstream run`'s supervision of its children, on real child processes."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest

from callstream.processes import ChildProcess
from callstream.supervisor import Child, supervise


def _child(tmp_path: Path, name: str, code: int) -> Child:
    """A child that appends a line to its own file each time it starts, then exits `code`."""
    script = f"open({str(tmp_path / name)!r}, 'a').write('started\\n'); raise SystemExit({code})"
    return Child(ChildProcess([sys.executable, "-c", script], name=name))


def _starts(tmp_path: Path, name: str) -> int:
    path = tmp_path / name
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_child_refusing_its_settings_is_not_restarted_while_a_crashing_one_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Oracle: exit code 2 (a setting it cannot use) is started once and reported once; any
    other exit is restarted (the first back-off is 2 s)."""
    misconfigured = _child(tmp_path, "misconfigured", 2)
    crashing = _child(tmp_path, "crashing", 1)
    until = time.monotonic() + 5.0
    with caplog.at_level(logging.WARNING):
        supervise([misconfigured, crashing], lambda: time.monotonic() > until)
    assert _starts(tmp_path, "misconfigured") == 1
    assert _starts(tmp_path, "crashing") >= 2
    refusals = [r for r in caplog.records if r.getMessage().startswith("misconfigured")]
    assert len(refusals) == 1
    assert "not restarted" in refusals[0].getMessage()
