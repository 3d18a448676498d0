"""`callstream bench --chart FILE.json`: the chart of an earlier run, redrawn from the results
file the bench's own writer produced, without running the bench."""

from __future__ import annotations

import dataclasses
import math
import struct
from pathlib import Path

import orjson

from callstream.bench.report import (
    ConsumerRun,
    FixedRateRun,
    Latency,
    ProcessUsage,
    Results,
    SecondStats,
    WrkRun,
    evaluate,
    write_json,
)
from callstream.bench.resultsfile import read_results
from tests.support.cli import cli_env, run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def latency(p50: float) -> Latency:
    return Latency(count=1000, p50_ms=p50, p90_ms=p50 * 2, p99_ms=p50 * 4, max_ms=p50 * 9)


def usage(name: str) -> list[ProcessUsage]:
    return [ProcessUsage(name, cpu_seconds=3.5, cpu_ms_per_report=0.4, peak_rss_mib=61.0)]


def wrk(server: str, body: str, size: int, rate: float) -> WrkRun:
    return WrkRun(
        server=server,
        label=f"{server} label",
        body=body,
        body_bytes=size,
        generator="wrk -t1 -c128 -d5s",
        duration_s=5.0,
        requests=int(rate * 5),
        non_2xx=0,
        socket_errors=0,
        reports_per_s=rate,
        server_counted=int(rate * 5),
        latency=latency(3.0),
        processes=usage(server),
        series=[(float(t), rate + t) for t in range(5)],
    )


def results() -> Results:
    """A run of every phase, shaped as `run_bench` fills it in."""
    seconds = [
        SecondStats(float(t), 100, 100, 2.0, 9.0, 20.0, 30.0 + t, 80.0 + t) for t in range(5)
    ]
    fixed = FixedRateRun(
        generator="callstream open loop",
        offered_per_s=100.0,
        duration_s=5.0,
        body_mix="every 20th report long",
        scheduled=500,
        ok=500,
        failed=0,
        achieved_per_s=100.0,
        latency=latency(2.0),
        latency_by_body={"sample": latency(2.0), "long transcript": latency(5.0)},
        service=latency(1.5),
        e2e=latency(40.0),
        e2e_matched=500,
        storage_write_mean_ms=0.8,
        processes=usage("ingress"),
        per_second=seconds,
        stored_series=[(float(t), 100.0) for t in range(5)],
        server_side={"ingress request (server side)": {"p50_ms": 1.0, "p99_ms": 5.0}},
    )
    consumers = [
        ConsumerRun(
            kind=kind,
            backend=backend,
            records=20_000,
            handled=20_000,
            rate_per_s=12_000.0,
            seconds=1.7,
            wall_seconds=4.0,
            rows=20_000,
            processes=usage("storage"),
            series=[(1.0, 11_000.0), (2.0, 13_000.0)],
        )
        for kind in ("catch-up", "replay")
        for backend in ("sqlite", "postgresql")
    ]
    run = Results(
        meta={"started_at": "2026-12-07T14:00:00+00:00", "cpus": 2, "cpu_model": "test"},
        wrk=[
            wrk(server, body, size, rate)
            for server, rate in (("bare", 9000.0), ("naive", 3000.0), ("ingress", 5000.0))
            for body, size in (("sample", 2_000), ("long transcript", 60_000))
        ],
        fixed_rate=fixed,
        consumers=consumers,
        produce_rate_per_s=40_000.0,
        spool=wrk("spool", "sample", 2_000, 2500.0),
        profile={"note": "py-spy is not installed (pip install py-spy)"},
    )
    run.targets = evaluate(run)
    return run


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_a_results_file_reads_back_as_the_results_it_was_written_from(tmp_path: Path) -> None:
    original = results()
    write_json(original, tmp_path / "run.json")
    assert read_results(tmp_path / "run.json") == original


def test_a_figure_that_was_not_measured_reads_back_as_nan(tmp_path: Path) -> None:
    original = results()
    assert original.fixed_rate is not None
    gap = dataclasses.replace(original.fixed_rate.per_second[2], e2e_p99_ms=math.inf)
    original.fixed_rate.per_second[2] = gap
    original.consumers[0] = dataclasses.replace(original.consumers[0], rate_per_s=math.nan)
    write_json(original, tmp_path / "run.json")  # both written as null

    back = read_results(tmp_path / "run.json")

    assert back.fixed_rate is not None
    assert math.isnan(back.fixed_rate.per_second[2].e2e_p99_ms)
    assert math.isnan(back.consumers[0].rate_per_s)
    assert back.fixed_rate.storage_write_mean_ms == 0.8


def test_bench_chart_redraws_the_png_of_a_results_file(tmp_path: Path) -> None:
    source = tmp_path / "20261207T140000Z.json"
    write_json(results(), source)
    target = tmp_path / "docs" / "bench-latest.png"

    done = run_cli("bench", "--chart", str(source), "--chart-out", str(target), env=cli_env())

    assert done.returncode == 0, done.stderr
    assert done.stdout == f"chart {target}\n"
    # figsize 15 x 11 inches at 100 dpi
    assert png_size(target) == (1500, 1100)
    assert target.stat().st_size > 50_000, "four panels of lines, not an empty canvas"


def test_bench_chart_writes_next_to_the_results_by_default(tmp_path: Path) -> None:
    source = tmp_path / "20261207T140000Z.json"
    write_json(results(), source)

    done = run_cli("bench", "--chart", str(source), env=cli_env())

    assert done.returncode == 0, done.stderr
    assert png_size(tmp_path / "20261207T140000Z.png") == (1500, 1100)


def test_bench_chart_of_a_missing_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = run_cli("bench", "--chart", str(tmp_path / "nothing.json"), env=cli_env())

    assert done.returncode == 2
    assert done.stderr == f"callstream bench --chart: no such file: {tmp_path / 'nothing.json'}\n"
    assert list(tmp_path.iterdir()) == []


def test_bench_chart_of_a_file_that_is_not_results_is_one_line_and_exit_2(
    tmp_path: Path,
) -> None:
    truncated = tmp_path / "truncated.json"
    truncated.write_bytes(b'{"meta": {"started_at": ')
    soak_summary = tmp_path / "soak-summary.json"
    soak_summary.write_text('{"minutes": 1, "sent": 10, "lost": 0}\n')
    wrong_shape = tmp_path / "wrong-shape.json"
    write_json(results(), wrong_shape)
    data = orjson.loads(wrong_shape.read_bytes())
    data["wrk"][0]["latency"] = "fast"
    wrong_shape.write_bytes(orjson.dumps(data))

    for bad, reason in (
        (truncated, "is not JSON"),
        (soak_summary, "is not a bench results file"),
        (wrong_shape, "is not a bench results file"),
    ):
        done = run_cli("bench", "--chart", str(bad), env=cli_env())
        assert done.returncode == 2, bad
        assert done.stderr.startswith(f"callstream bench --chart: {bad} {reason}"), done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        assert not bad.with_suffix(".png").exists()


def test_the_chart_of_a_run_of_one_phase_draws_without_warnings(tmp_path: Path) -> None:
    """`callstream bench --phases fixed-rate` has no closed-loop or catch-up runs to draw."""
    source = tmp_path / "20261207T140000Z.json"
    write_json(dataclasses.replace(results(), wrk=[], spool=None, consumers=[]), source)

    done = run_cli("bench", "--chart", str(source), env=cli_env())

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert png_size(tmp_path / "20261207T140000Z.png") == (1500, 1100)
