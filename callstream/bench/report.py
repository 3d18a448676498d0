"""The bench's results: what was measured, the targets, the JSON file and the printed table,
and the run's circumstances (machine, versions, revision)."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

from callstream.bench.options import BenchOptions
from callstream.bench.procstat import loadavg
from callstream.kafkajars import KAFKA_VERSION


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (inf counts as the slowest)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True, slots=True)
class Latency:
    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of_wrk(cls, summary: dict[str, Any]) -> Latency:
        """wrk's own figures (its summary line, microseconds), from send to answer."""
        lat = summary["latency_us"]
        return cls(summary["requests"], *(lat[q] / 1000 for q in ("p50", "p90", "p99", "max")))

    @classmethod
    def of_seconds(cls, values: Iterable[float]) -> Latency:
        ordered = sorted(values)
        # The 100th percentile is the maximum (NaN when there are no values).
        return cls(len(ordered), *(percentile(ordered, q) * 1000 for q in (50, 90, 99, 100)))


@dataclass(frozen=True)
class WrkTotals:
    """The counts a closed-loop run reports from wrk's summary; `good` is what was accepted."""

    seconds: float
    requests: int
    non_2xx: int
    socket_errors: int

    @property
    def good(self) -> int:
        return self.requests - self.non_2xx

    @property
    def per_second(self) -> float:
        return round(self.good / self.seconds, 1)

    @classmethod
    def of_wrk(cls, summary: dict[str, Any]) -> WrkTotals:
        errors = summary["errors"]
        return cls(
            seconds=summary["duration_us"] / 1e6,
            requests=summary["requests"],
            non_2xx=errors["status"],
            socket_errors=errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
        )


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    name: str
    cpu_seconds: float
    cpu_ms_per_report: float | None  # CPU seconds per 1,000 reports, in other words
    peak_rss_mib: float | None


@dataclass(frozen=True, slots=True)
class WrkRun:
    """Closed loop: wrk's connections each send the next request as soon as one returns."""

    server: str  # bare | naive | ingress | spool
    label: str
    body: str
    body_bytes: int
    generator: str
    duration_s: float
    requests: int
    non_2xx: int
    socket_errors: int
    reports_per_s: float
    server_counted: int | None  # accepted, by the server's own counter
    latency: Latency
    processes: list[ProcessUsage]
    series: list[tuple[float, float]]  # (seconds into the run, reports/s in that second)
    workers: int | None = None  # ingress processes (CALLSTREAM_INGRESS_WORKERS); None: n/a


@dataclass(frozen=True, slots=True)
class SecondStats:
    t: float
    sent: int
    ok: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    e2e_p50_ms: float
    e2e_p99_ms: float


@dataclass(frozen=True, slots=True)
class FixedRateRun:
    """Open loop: requests go out on a clock; latency counts from the scheduled time."""

    generator: str
    offered_per_s: float
    duration_s: float
    body_mix: str
    scheduled: int
    ok: int
    failed: int
    achieved_per_s: float
    latency: Latency  # scheduled send -> response
    latency_by_body: dict[str, Latency]
    service: Latency  # actual send -> response
    e2e: Latency | None  # POST sent -> row in storage (stored_at)
    e2e_matched: int
    storage_write_mean_ms: float | None
    processes: list[ProcessUsage]
    per_second: list[SecondStats]
    stored_series: list[tuple[float, float]]
    # From the ingress's own histograms over the same window: bucket bounds, so "at most".
    server_side: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ConsumerRun:
    kind: str  # catch-up | replay
    backend: str  # sqlite | postgresql
    records: int
    handled: int
    rate_per_s: float  # from first commit to last
    seconds: float
    wall_seconds: float  # from process start, start-up and group join included
    rows: int
    processes: list[ProcessUsage]
    series: list[tuple[float, float]]
    note: str = ""


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    wanted: str
    measured: str
    met: bool | None  # None: not measured


@dataclass(frozen=True, slots=True)
class DrainRun:
    """A spool left by a run with Kafka away, drained by a new ingress with Kafka back."""

    records: int
    # From the first acknowledged batch until the spool is empty: the drainer's own rate.
    seconds: float
    rate_per_s: float
    # From starting the ingress (recovery of the spool and connecting included).
    from_start_seconds: float
    fill_per_s: float  # how fast the spool was filled (the bench, not the ingress)


@dataclass(frozen=True, slots=True)
class LargeRun:
    """Closed loop where a share of the reports are long calls, and where its bound is."""

    label: str  # what was varied: "defaults", or the settings given
    env: dict[str, str]
    generator: str
    mix: str
    duration_s: float
    requests: int
    non_2xx: int
    socket_errors: int
    reports_per_s: float
    mb_per_s: float  # request bodies of 2xx answers, 10^6 bytes per second
    latency: Latency  # wrk's, from send to answer
    accepted: int  # by the ingress's own counter
    spooled: int  # callstream_ingress_spool_writes_total over the run
    ack_missed: int  # callstream_ingress_kafka_ack_missed_total over the run
    spool_left: int  # still spooled when the drain wait ended
    drain_seconds: float  # from the end of the load until the spool was empty (or gave up)
    # From the ingress's histograms over the run: bucket bounds, so "at most".
    kafka_ack: dict[str, float]
    spool_fsync: dict[str, float]
    publish: dict[str, float]
    fsyncs: int
    ingress_core: float  # CPU seconds per second: 1.0 is one core, all an event loop has
    broker_core: float
    processes: list[ProcessUsage]
    series: list[tuple[float, float]]
    bound: str


@dataclass(slots=True)
class Results:
    meta: dict[str, Any]
    wrk: list[WrkRun] = field(default_factory=list)
    fixed_rate: FixedRateRun | None = None
    consumers: list[ConsumerRun] = field(default_factory=list)
    produce_rate_per_s: float | None = None
    spool: WrkRun | None = None
    spool_note: str = ""
    drain: DrainRun | None = None
    large: list[LargeRun] = field(default_factory=list)
    profile: dict[str, Any] | None = None
    targets: list[Target] = field(default_factory=list)

    def wrk_run(self, server: str, body_index: int) -> WrkRun | None:
        runs = [r for r in self.wrk if r.server == server]
        bodies = sorted({r.body_bytes for r in self.wrk})
        if body_index >= len(bodies):
            return None
        return next((r for r in runs if r.body_bytes == bodies[body_index]), None)

    def consumer_run(self, kind: str, backend: str) -> ConsumerRun | None:
        return next((c for c in self.consumers if c.kind == kind and c.backend == backend), None)


# Storage catch-up and replay, SQLite and PostgreSQL alike ("consumers at database speed").
CONSUMER_TARGET_PER_S = 30_000


def evaluate(results: Results) -> list[Target]:
    """The targets of docs/performance.md, each met, missed or not measured."""
    targets: list[Target] = []
    ingress, naive = results.wrk_run("ingress", 0), results.wrk_run("naive", 0)
    if ingress is not None and naive is not None:
        # One ingress process against the baseline's one process: the checks cost nothing
        # when the signed, validated, Avro path keeps up with plain json + send_and_wait.
        ratio = ingress.reports_per_s / naive.reports_per_s
        name = f"ingress (1 worker) vs json + send_and_wait, {ingress.body}"
        targets.append(Target(name, ">= 1.00x", f"{ratio:.2f}x", ratio >= 1.0))
    if ingress is not None:
        cpu = _server_cpu(ingress)
        measured = "not measured" if cpu is None else f"{cpu:.3f} ms"
        met = None if cpu is None else cpu <= 0.12
        name = f"ingress CPU per report, {ingress.body}"
        targets.append(Target(name, "<= 0.12 ms", measured, met))
    if (fixed := results.fixed_rate) is not None:
        e2e = fixed.e2e
        name = f"POST -> row p99 at {fixed.offered_per_s:,.0f} reports/s offered"
        measured = "not measured" if e2e is None else f"{e2e.p99_ms:.1f} ms"
        met = None if e2e is None else e2e.p99_ms < 50 and fixed.failed == 0
        targets.append(Target(name, "< 50 ms", measured, met))
    for kind, backend in itertools.product(("catch-up", "replay"), ("postgresql", "sqlite")):
        run = results.consumer_run(kind, backend)
        measured = "not measured" if run is None else f"{run.rate_per_s:,.0f}/s"
        ok = (
            None
            if run is None
            else run.handled >= run.records and run.rate_per_s >= CONSUMER_TARGET_PER_S
        )
        targets.append(Target(f"storage {kind}, {backend}", ">= 30,000/s", measured, ok))
    met = None
    measured = results.spool_note or "not measured"
    if results.spool is not None:
        rate = results.spool.reports_per_s
        measured, met = f"{rate:,.0f}/s", rate >= 2000
    targets.append(Target("spool path (Kafka down, fsync)", ">= 2,000/s", measured, met))
    drain = results.drain
    measured = "not measured" if drain is None else f"{drain.rate_per_s:,.0f}/s"
    met = None if drain is None else drain.rate_per_s >= 5000
    targets.append(Target("spool drain (Kafka back)", ">= 5,000/s", measured, met))
    return targets


def write_json(results: Results, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # orjson writes dataclasses as objects, and NaN/inf (a missing figure) as null.
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0 or math.isnan(base) or math.isnan(value):
        return "-"
    return f"{value / base:.2f}x"


OTHERS = "other processes"


def _cpu(processes: Sequence[ProcessUsage]) -> str:
    mine = "  ".join(
        f"{p.name} {_num(p.cpu_ms_per_report, 3)}" for p in processes if p.cpu_ms_per_report
    )
    others = next((p.cpu_seconds for p in processes if p.name == OTHERS), None)
    return mine + (f"  [{OTHERS}: {others:.1f} CPU-s]" if others else "")


def _server_cpu(run: WrkRun) -> float | None:
    return run.processes[0].cpu_ms_per_report if run.processes else None


def _mem(processes: Sequence[ProcessUsage]) -> str:
    return "  ".join(f"{p.name} {_num(p.peak_rss_mib, 0)}" for p in processes if p.peak_rss_mib)


def _workers_lines(results: Results) -> list[str]:
    runs = [r for r in results.wrk if r.workers is not None]
    if len({r.workers for r in runs}) < 2:
        return []
    out = ["  ingress by workers (CPU: the parent and all its workers, ms per report):"]
    for body in sorted({r.body_bytes for r in runs}):
        same = sorted((r for r in runs if r.body_bytes == body), key=lambda r: r.workers or 0)
        for run in same:
            scale = _ratio(run.reports_per_s, same[0].reports_per_s)
            count = f"{run.workers} worker{'s' if run.workers != 1 else ''}"
            out.append(
                f"    {count:<12}{run.body:<24}{run.reports_per_s:>10,.0f}/s"
                f"  CPU {_num(_server_cpu(run), 3)} ms/report  {scale} of one worker"
            )
    return out


def _bounds(figures: dict[str, float]) -> str:
    return "  ".join(f"{k.split('_')[0]} <= {_num(v, 1)}" for k, v in figures.items()) + " ms"


def _large_lines(run: LargeRun) -> list[str]:
    lat = run.latency
    return [
        f"{run.label} ({run.mix}):",
        f"  {run.reports_per_s:,.0f} reports/s, {run.mb_per_s:.1f} MB/s accepted;"
        f" answer p50 {_num(lat.p50_ms)} ms, p99 {_num(lat.p99_ms)} ms;"
        f" errors {run.non_2xx + run.socket_errors}",
        f"  spooled {run.spooled:,} of {run.accepted:,} accepted"
        f" ({run.ack_missed:,} waited out the ack deadline; {run.spool_left:,} left after"
        f" {run.drain_seconds:.0f} s)",
        f"  Kafka ack {_bounds(run.kafka_ack)};  publish {_bounds(run.publish)}",
        f"  spool fsync {_bounds(run.spool_fsync)} ({run.fsyncs:,} fsyncs)",
        f"  cores: ingress {run.ingress_core:.2f}, broker {run.broker_core:.2f};"
        f" CPU ms per report: {_cpu(run.processes)}",
        f"  bound: {run.bound}",
    ]


def render_table(results: Results) -> str:
    out: list[str] = []
    add = out.append
    meta = results.meta
    add(
        f"callstream bench {meta.get('started_at', '')}  "
        f"{meta.get('cpus', '?')} CPUs  load at start {meta.get('loadavg_start', '?')}"
    )
    if results.wrk:
        add(f"\nClosed loop, {results.wrk[0].generator} (latency: wrk, from send; not CO-safe)")
        add(
            f"  {'server':<26}{'body':<24}{'reports/s':>10}{'p50 ms':>9}{'p90 ms':>9}"
            f"{'p99 ms':>9}{'max ms':>9}{'errors':>8}{'vs bare':>9}{'vs naive':>9}"
        )
        for run in results.wrk:
            index = sorted({r.body_bytes for r in results.wrk}).index(run.body_bytes)
            bare = results.wrk_run("bare", index)
            naive = results.wrk_run("naive", index)
            lat = run.latency
            add(
                f"  {run.label:<26}{run.body:<24}{run.reports_per_s:>10,.0f}"
                f"{_num(lat.p50_ms):>9}{_num(lat.p90_ms):>9}{_num(lat.p99_ms):>9}"
                f"{_num(lat.max_ms):>9}{run.non_2xx + run.socket_errors:>8}"
                f"{_ratio(run.reports_per_s, bare.reports_per_s if bare else None):>9}"
                f"{_ratio(run.reports_per_s, naive.reports_per_s if naive else None):>9}"
            )
        add("  ingress as a ratio to the baselines (reports/s: higher is better; the rest lower):")
        bodies = range(len({r.body_bytes for r in results.wrk}))
        for index, base_name in itertools.product(bodies, ("bare", "naive")):
            ingress, base = results.wrk_run("ingress", index), results.wrk_run(base_name, index)
            if ingress is None or base is None:
                continue
            add(
                f"    vs {base.label:<24}{ingress.body:<24}"
                f"reports/s {_ratio(ingress.reports_per_s, base.reports_per_s)}  "
                f"p50 {_ratio(ingress.latency.p50_ms, base.latency.p50_ms)}  "
                f"p99 {_ratio(ingress.latency.p99_ms, base.latency.p99_ms)}  "
                f"server CPU/report {_ratio(_server_cpu(ingress), _server_cpu(base))}"
            )
        add("  CPU ms per report (= CPU s per 1,000) and peak RSS MiB, by process:")
        for run in results.wrk:
            add(f"    {run.label:<24}{run.body:<24}{_cpu(run.processes)}")
            add(f"    {'':<24}{'':<24}{_mem(run.processes)}")
        out.extend(_workers_lines(results))
    fixed = results.fixed_rate
    if fixed is not None:
        add(f"\nFixed rate, {fixed.generator}: {fixed.body_mix}")
        add(
            f"  offered {fixed.offered_per_s:,.0f}/s for {fixed.duration_s:.0f} s: "
            f"{fixed.ok:,} accepted, {fixed.failed:,} failed, {fixed.achieved_per_s:,.0f}/s"
        )
        for name, figures in (
            ("latency from scheduled send (CO-safe)", fixed.latency),
            ("service time from actual send", fixed.service),
            ("end to end: POST -> row in storage", fixed.e2e),
        ):
            if figures is None:
                add(f"  {name:<40} not measured")
                continue
            add(
                f"  {name:<40} p50 {_num(figures.p50_ms)}  p90 {_num(figures.p90_ms)}  "
                f"p99 {_num(figures.p99_ms)}  max {_num(figures.max_ms)} ms  "
                f"(n={figures.count:,})"
            )
        for body, figures in fixed.latency_by_body.items():
            add(
                f"    {body:<38} p50 {_num(figures.p50_ms)}  p99 {_num(figures.p99_ms)}  "
                f"max {_num(figures.max_ms)} ms  (n={figures.count:,})"
            )
        for name, bounds in fixed.server_side.items():
            add(f"  {name:<40} {_bounds(bounds)} (histogram buckets)")
        if fixed.storage_write_mean_ms is not None:
            add(f"  {'storage batch write + commit (mean)':<40} {fixed.storage_write_mean_ms} ms")
        add(f"  CPU ms per report: {_cpu(fixed.processes)}")
        add(f"  peak RSS MiB:      {_mem(fixed.processes)}")
    if results.consumers:
        produced = results.produce_rate_per_s
        add(
            "\nStorage consumer on a pre-filled topic (fresh consumer group each run"
            + (f"; topic filled at {produced:,.0f}/s" if produced else "")
            + ")"
        )
        add(
            f"  {'run':<24}{'records':>9}{'rows':>9}{'records/s':>11}{'seconds':>9}"
            f"{'wall s':>8}  CPU ms per report"
        )
        for consumer in results.consumers:
            add(
                f"  {consumer.kind + ' ' + consumer.backend:<24}{consumer.handled:>9,}"
                f"{consumer.rows:>9,}{consumer.rate_per_s:>11,.0f}{consumer.seconds:>9.1f}"
                f"{consumer.wall_seconds:>8.1f}  {_cpu(consumer.processes)}"
                + (f"  ({consumer.note})" if consumer.note else "")
            )
    if results.spool is not None:
        add(f"\nSpool path: {results.spool.reports_per_s:,.0f} reports/s")
    elif results.spool_note:
        add(f"\nSpool path: {results.spool_note}")
    if (drain := results.drain) is not None:
        add(
            f"\nSpool drain: {drain.records:,} reports in {drain.seconds:.1f} s, "
            f"{drain.rate_per_s:,.0f}/s ({drain.from_start_seconds:.1f} s from the ingress's "
            "start, recovery and connecting included)"
        )
    if results.large:
        add(f"\nLarge reports, {results.large[0].generator}")
        for large in results.large:
            add("  " + "\n  ".join(_large_lines(large)))
    if results.profile:
        add("\nProfiles (py-spy, share of on-CPU samples by stage)")
        for name, summary in results.profile.items():
            if not isinstance(summary, dict):
                continue
            stages = summary.get("stages_percent") or []
            rate = summary.get("reports_per_s_while_profiled") or summary.get(
                "records_per_s_while_profiled"
            )
            add(f"  {name} ({_num(rate, 0)}/s while profiled): {summary.get('note', '')}")
            add("    " + ", ".join(f"{stage} {pct:.0f}%" for stage, pct in stages[:8]))
    if results.targets:
        add("\nTargets")
        for target in results.targets:
            state = {True: "met", False: "MISSED", None: "not measured"}[target.met]
            add(f"  {state:<13}{target.name:<58}{target.wanted:>12}  measured {target.measured}")
    return "\n".join(out)


def run_meta(options: BenchOptions, started_at: datetime) -> dict[str, Any]:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "-"

    cpu_model = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu_model = next(
            (x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), ""
        )
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
