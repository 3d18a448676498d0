"""The bench run's circumstances, recorded with its results: machine, versions, revision."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from callstream.bench.options import BenchOptions
from callstream.bench.procstat import loadavg
from callstream.localkafka import KAFKA_VERSION


def run_meta(options: BenchOptions, started_at: datetime) -> dict[str, Any]:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "-"

    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "started_at": started_at.isoformat(timespec="seconds"),
        "argv": sys.argv,
        "options": {
            name: str(getattr(options, name)) for name in BenchOptions.__dataclass_fields__
        },
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "loadavg_start": loadavg(),
        "python": platform.python_version(),
        "kafka": KAFKA_VERSION,
        "git_revision": git_revision(options.pythonpath or Path.cwd()),
        "versions": {
            name: version(name)
            for name in ("aiohttp", "aiokafka", "uvloop", "fastavro", "orjson", "asyncpg")
        },
        "signature_tolerance": "default 300 s: each pool is signed just before its run",
    }


def git_revision(where: Path) -> str:
    """The short revision of the git checkout holding `where`; "-" when it is in none."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if done.returncode == 0:
            return done.stdout.strip()
    return "-"
