"""A small real filesystem (tmpfs) for tests that need a disk to fill up or turn read-only.

Mounting needs root, which the test machines and CI have; without it the test fails, as
with any missing dependency."""

from __future__ import annotations

import contextlib
import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"mount {' '.join(args)}: {done.stderr.strip()}"


@contextlib.contextmanager
def small_disk(mount_point: Path, size: str = "1m") -> Iterator[Path]:
    mount_point.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point))
    try:
        yield mount_point
    finally:
        # Lazily: a test that failed half-way may still hold a file open there.
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(disk: Path) -> Path:
    """Write a filler file until the disk has no byte left; returns it (delete to free)."""
    filler = disk / "filler"
    # Unbuffered: a buffered file would fail once more on close, with what it still holds.
    with filler.open("wb", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 4096)
    probe = disk / "probe"
    try:
        probe.write_bytes(b"\0" * 4096)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            return filler
        raise
    raise AssertionError(f"{disk} still has room after filling it")


def set_read_only(disk: Path, read_only: bool) -> None:
    _mount("-o", f"remount,{'ro' if read_only else 'rw'}", str(disk))
