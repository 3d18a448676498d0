"""Reading what a bench phase measured: wrk's summary, stored rows, histogram buckets."""

from __future__ import annotations

import math
import signal
import sqlite3
import subprocess
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from callstream.bench.services import Measured


def wrk_summary(run: Measured) -> dict[str, Any]:
    line = next((x for x in run.output.splitlines() if x.startswith("CALLSTREAM_WRK ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary (exit {run.exit_code}):\n{run.output}")
    data: dict[str, Any] = orjson.loads(line.split(" ", 1)[1])
    return data


def stop_py_spy(spy: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """py-spy writes its output when it is interrupted (or its duration ends)."""
    if spy.poll() is None:
        spy.send_signal(signal.SIGINT)
    try:
        spy.wait(timeout)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()
    if spy.stderr is not None:
        spy.stderr.close()


def stored_times(db: Path) -> dict[str, float]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT call_id, stored_at FROM call_reports").fetchall()
    finally:
        conn.close()
    return {call_id: datetime.fromisoformat(stamp).timestamp() for call_id, stamp in rows}


def sqlite_count(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM call_reports").fetchone()[0])
    finally:
        conn.close()


async def postgres_count(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM call_reports"))
    finally:
        await conn.close()


def bucket_quantiles(
    before: Mapping[float, float], after: Mapping[float, float]
) -> dict[str, float]:
    """Upper bounds (ms) of the buckets holding p50, p90 and p99 of what a histogram
    observed between two scrapes."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    out: dict[str, float] = {}
    for q in (50, 90, 99):
        bound = next((b for b, c in zip(bounds, counts, strict=True) if c >= total * q / 100), None)
        out[f"p{q}_at_most_ms"] = math.nan if bound is None or not total else bound * 1000
    return out


def smooth(series: list[tuple[float, float]], window: float) -> list[tuple[float, float]]:
    """Rates averaged over at least `window` seconds: 0.1 s polls are too jumpy to plot."""
    out: list[tuple[float, float]] = []
    bucket: list[float] = []
    start: float | None = None
    for t, rate in series:
        start = t if start is None else start
        bucket.append(rate)
        if t - start >= window:
            out.append((round(t, 2), round(sum(bucket) / len(bucket), 1)))
            bucket, start = [], None
    return out
