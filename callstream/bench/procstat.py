"""CPU time and peak memory of the processes under test, read from /proc (Linux only)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name in parentheses may itself hold spaces; fields resume after ")".
    return text.rpartition(")")[2].split()


def cpu_seconds(pid: int, *, with_children: bool = False) -> float:
    """utime + stime of every thread of `pid`; with_children adds its reaped children."""
    fields = _fields(pid)
    # fields[11..14]: utime, stime, cutime, cstime (stat fields 14..17), in clock ticks.
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICKS


def descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents.setdefault(int(_fields(int(entry.name))[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out += children
        todo += children
    return out


def tree_cpu_seconds(pid: int) -> float:
    """A process tree's CPU (a postmaster and its backends): live processes plus the
    children they have reaped, so a backend that exits mid-phase is still counted."""
    total = cpu_seconds(pid, with_children=True)
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            total += cpu_seconds(child, with_children=True)
    return total


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM: the most resident memory the process has had since it started."""
    return _status_kib(pid, "VmHWM:")


def rss_kib(pid: int) -> int | None:
    """VmRSS: the process's resident memory now."""
    return _status_kib(pid, "VmRSS:")


def _status_kib(pid: int, field: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    return None


def tree_peak_rss_kib(pid: int) -> int | None:
    """The largest VmHWM in a process tree (summing would count shared memory again
    for every PostgreSQL backend)."""
    values = (peak_rss_kib(p) for p in (pid, *descendants(pid)))
    return max((v for v in values if v is not None), default=None)


@dataclass(frozen=True, slots=True)
class Watched:
    """A long-running process whose CPU is read at the start and end of each phase."""

    name: str
    pid: int
    tree: bool = False

    def cpu(self) -> float:
        try:
            return tree_cpu_seconds(self.pid) if self.tree else cpu_seconds(self.pid)
        except OSError:
            return float("nan")

    def peak_rss_kib(self) -> int | None:
        return tree_peak_rss_kib(self.pid) if self.tree else peak_rss_kib(self.pid)


def loadavg() -> tuple[float, float, float]:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


def machine_busy_seconds() -> float:
    """CPU time every process on the machine has used since boot (all CPUs, not idle)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICKS
