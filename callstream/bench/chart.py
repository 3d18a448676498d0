"""One PNG per bench run: throughput and latency over time, every phase on its own panel."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TextIO

from callstream.bench.report import CONSUMER_TARGET_PER_S, Results
from callstream.bench.resultsfile import ResultsFileError, read_results

_COLOURS = {
    "bare": "#7f7f7f",
    "naive": "#d62728",
    "ingress": "#1f77b4",
    "ingress-2w": "#17becf",
    "spool": "#9467bd",
}


def redraw(source: Path, target: Path | None, out: TextIO, err: TextIO) -> int:
    """`callstream bench --chart FILE.json [--chart-out PNG]`: the chart of an earlier run,
    without running the bench; by default next to the results, as the run itself puts it."""
    target = target if target is not None else source.with_suffix(".png")
    try:
        results = read_results(source)
        write_chart(results, target)
    except ResultsFileError as exc:
        err.write(f"callstream bench --chart: {exc}\n")
        return 2
    except ImportError:
        err.write("callstream bench --chart: needs matplotlib: pip install -e '.[bench]'\n")
        return 2
    except OSError as exc:
        err.write(f"callstream bench --chart: cannot write {target}: {exc.strerror or exc}\n")
        return 2
    out.write(f"chart {target}\n")
    return 0


def write_chart(results: Results, path: Path) -> Path:
    # matplotlib is the optional `bench` extra: imported here, so that without it only the
    # chart is missing (the caller catches the ImportError).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else f"{value:g}")

    fig, axes = plt.subplots(2, 2, figsize=(15, 11), layout="constrained")
    (closed, rate), (latency, consumers) = axes
    fig.suptitle(
        f"callstream bench {results.meta.get('started_at', '')} "
        f"({results.meta.get('cpus', '?')} CPUs, {results.meta.get('cpu_model', '')})",
        fontsize=12,
    )

    bodies = sorted({r.body_bytes for r in results.wrk})
    for run in [*results.wrk, *([results.spool] if results.spool else [])]:
        if not run.series:
            continue
        xs, ys = zip(*run.series, strict=True)
        long = run.body_bytes in bodies[1:]
        closed.plot(
            xs,
            ys,
            color=_COLOURS.get(run.server, "black"),
            linestyle="--" if long else "-",
            marker="." if long else None,
            label=f"{run.label}, {run.body}: {run.reports_per_s:,.0f}/s",
        )
    generator = results.wrk[0].generator if results.wrk else "wrk"
    closed.set_title(f"Closed loop: accepted per second ({generator})")
    closed.set_xlabel("seconds into the run")
    closed.set_ylabel("reports/s (log scale)")
    closed.set_yscale("log")
    closed.yaxis.set_major_formatter(plain)
    if closed.get_legend_handles_labels()[0]:  # a run of some phases may have drawn none
        closed.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    closed.grid(alpha=0.3)

    fixed = results.fixed_rate
    if fixed is not None and fixed.per_second:
        ts = [s.t for s in fixed.per_second]
        rate.plot(ts, [s.sent for s in fixed.per_second], label="scheduled", color="#7f7f7f")
        rate.plot(ts, [s.ok for s in fixed.per_second], label="accepted (202)", color="#1f77b4")
        if fixed.stored_series:
            xs, ys = zip(*fixed.stored_series, strict=True)
            rate.plot(xs, ys, label="handled by storage consumer", color="#2ca02c")
        rate.set_title(f"Fixed rate {fixed.offered_per_s:,.0f}/s, open loop: {fixed.body_mix}")
        rate.set_xlabel("seconds into the run")
        rate.set_ylabel("reports/s")
        rate.set_ylim(bottom=0, top=fixed.offered_per_s * 1.6)
        rate.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)
        rate.grid(alpha=0.3)
        for key, label, colour, style in (
            ("p50_ms", "p50", "#1f77b4", "-"),
            ("p99_ms", "p99", "#ff7f0e", "-"),
            ("max_ms", "max", "#d62728", ":"),
            ("e2e_p50_ms", "end to end p50 (POST to row)", "#2ca02c", "--"),
            ("e2e_p99_ms", "end to end p99", "#17becf", "--"),
        ):
            values = [getattr(s, key) for s in fixed.per_second]
            finite = [v if math.isfinite(v) else math.nan for v in values]
            latency.plot(ts, finite, label=label, color=colour, linestyle=style)
        latency.axhline(
            50, color="green", linewidth=0.8, linestyle=":", label="target 50 ms (end to end p99)"
        )
        latency.set_yscale("log")
        latency.yaxis.set_major_formatter(plain)
        latency.yaxis.set_minor_formatter(plain)
        latency.set_title(
            "Fixed rate: latency per second, from the scheduled send (coordinated-omission safe)"
        )
        latency.set_xlabel("seconds into the run")
        latency.set_ylabel("ms (log scale)")
        latency.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)
        latency.grid(alpha=0.3, which="both")
    else:
        for ax in (rate, latency):
            ax.text(0.5, 0.5, "fixed-rate phase not run", ha="center", transform=ax.transAxes)

    for consumer in results.consumers:
        if not consumer.series:
            continue
        xs, ys = zip(*consumer.series, strict=True)
        consumers.plot(
            xs,
            ys,
            linestyle="-" if consumer.kind == "catch-up" else "--",
            color="#1f77b4" if consumer.backend == "postgresql" else "#ff7f0e",
            label=f"{consumer.kind} {consumer.backend}: {consumer.rate_per_s:,.0f}/s",
        )
    consumers.axhline(
        CONSUMER_TARGET_PER_S, color="green", linewidth=0.8, linestyle=":", label="target 30,000/s"
    )
    consumers.set_title("Storage consumer on a pre-filled topic: records handled per second")
    consumers.set_xlabel("seconds since the consumer process started")
    consumers.set_ylabel("records/s")
    consumers.set_ylim(bottom=0)
    consumers.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)
    consumers.grid(alpha=0.3)

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
