"""The bench's verdicts are the targets docs/performance.md states: the ingress against the
straightforward baseline and at 0.12 CPU ms per report, POST -> row under 50 ms, storage at
30,000/s; each met, missed or not measured."""

from __future__ import annotations

import dataclasses

from callstream.bench.report import Latency, ProcessUsage, Target, evaluate
from tests.unit.test_bench_chart import results


def by_name(targets: list[Target]) -> dict[str, Target]:
    return {t.name.split(",")[0]: t for t in targets}


def test_every_target_of_the_fixture_run_is_judged() -> None:
    targets = by_name(evaluate(results()))
    # ingress 5,000/s against the baseline's 3,000/s, at 0.4 ms per report.
    assert targets["ingress (1 worker) vs json + send_and_wait"].met is True
    assert targets["ingress CPU per report"].met is False
    assert targets["ingress CPU per report"].measured == "0.400 ms"
    # e2e p99 is 4 x 40 ms in the fixture.
    assert targets["POST -> row p99 at 100 reports/s offered"].met is False
    assert targets["storage catch-up"].met is False  # 12,000/s
    assert targets["storage catch-up"].wanted == ">= 30,000/s"


def test_a_fast_enough_run_meets_them() -> None:
    run = results()
    cheap = [ProcessUsage("ingress", 1.0, 0.1, 60.0)]
    run.wrk = [
        dataclasses.replace(w, processes=cheap) if w.server == "ingress" else w for w in run.wrk
    ]
    assert run.fixed_rate is not None
    run.fixed_rate = dataclasses.replace(
        run.fixed_rate, e2e=Latency(count=9, p50_ms=5, p90_ms=8, p99_ms=12, max_ms=20)
    )
    run.consumers = [dataclasses.replace(c, rate_per_s=31_000.0) for c in run.consumers]
    targets = evaluate(run)
    assert {t.name: t.met for t in targets if t.met is not True} == {
        "spool drain (Kafka back)": None
    }


def test_a_phase_not_run_is_not_measured_rather_than_missed() -> None:
    run = results()
    run.consumers = []
    run.fixed_rate = None
    targets = by_name(evaluate(run))
    assert targets["storage replay"].met is None
    assert targets["storage replay"].measured == "not measured"
    assert not any(name.startswith("POST") for name in targets)
