"""The large-reports phase: a closed loop at --connections where every --long-every-th report
is a long call (~59 kB: transcript and messages), the rest the sample report, with the
figures that say where the bound is.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from callstream.bench import pool, profiling
from callstream.bench.harness import Harness
from callstream.bench.report import LargeRun, Latency, ProcessUsage, WrkTotals
from callstream.bench.services import (
    CpuWindow,
    Sampler,
    Service,
    bucket_quantiles,
    py_spy_record,
    wrk_summary,
)

ACCEPTED = 'callstream_ingress_requests_total{outcome="accepted"}'
SPOOLED = "callstream_ingress_spool_writes_total"
ACK_MISSED = "callstream_ingress_kafka_ack_missed_total"
SPOOL_RECORDS = "callstream_ingress_spool_records"
ACK_SECONDS = "callstream_ingress_kafka_ack_duration_seconds"
FSYNC_SECONDS = "callstream_ingress_spool_fsync_duration_seconds"
PUBLISH_SECONDS = "callstream_ingress_publish_duration_seconds"
# Distinct signed requests wrk cycles through: enough that a call comes round every second or
# two at the rates seen, so call ids do repeat within a run (replay detection is off); at
# most 256 long ones (15 MB of Lua).
POOL_SIZE = 4096
POOL_LONG = 256
# After the load stops: how long the spool gets to empty before the run says it did not.
DRAIN_WAIT_SECONDS = 120.0
# Shares of a core or of the run above which a figure is called the bound.
SATURATED_CORE = 0.85
SPOOLED_SHARE = 0.10


def bound_of(
    *,
    accepted: int,
    spooled: int,
    ack_missed: int,
    ingress_core: float,
    broker_core: float,
    machine_cores: float,
    cpus: int,
    ack_p50_ms: float,
    answer_p50_ms: float,
) -> str:
    """Where the closed loop's throughput is bounded, in one sentence: the first figure
    that applies, in this order."""
    if accepted and spooled / accepted >= SPOOLED_SHARE:
        return (
            f"the spool: {spooled / accepted:.0%} of accepted reports went to disk instead of"
            f" Kafka ({ack_missed:,} waited out the acknowledgement deadline)"
        )
    if ingress_core >= SATURATED_CORE:
        return f"ingress CPU: its event loop used {ingress_core:.0%} of a core"
    if broker_core >= SATURATED_CORE:
        return f"broker CPU: {broker_core:.0%} of a core"
    if cpus and machine_cores >= SATURATED_CORE * cpus:
        return (
            f"the machine's CPUs: {machine_cores:.1f} of {cpus} cores busy (ingress"
            f" {ingress_core:.0%}, broker {broker_core:.0%}, the rest wrk and others)"
        )
    if answer_p50_ms > 0 and ack_p50_ms >= 0.5 * answer_p50_ms:
        return (
            f"Kafka's acknowledgement: p50 <= {ack_p50_ms:g} ms of a {answer_p50_ms:.0f} ms answer"
        )
    return "not one clear bound: no process saturated and Kafka acknowledges quickly"


def mean_body_bytes(requests: Sequence[pool.SignedRequest]) -> float:
    """The mean body size of a pool wrk cycles through (headers are not counted as data)."""
    bodies = [len(r.raw) - r.raw.index(b"\r\n\r\n") - 4 for r in requests]
    return sum(bodies) / len(bodies) if bodies else math.nan


def _core_share(processes: Sequence[ProcessUsage], name: str, seconds: float) -> float:
    cpu = next((p.cpu_seconds for p in processes if p.name == name), math.nan)
    return cpu / seconds if seconds > 0 else math.nan


class LargeReports(Harness):
    async def phase_large(self) -> None:
        """The mix of --long-every, then every report a long call (the worst case)."""
        for long_every in dict.fromkeys((self.o.long_every, 1)):
            if long_every > 0:
                self.results.large.append(await self.large_run(long_every))

    async def _wait_drained(self, service: Service) -> tuple[int, float]:
        """Spooled reports left once the drainer had DRAIN_WAIT_SECONDS, and how long it took."""
        started = time.monotonic()
        left = 0.0
        while time.monotonic() - started < DRAIN_WAIT_SECONDS:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                left = await self._metric(service, SPOOL_RECORDS) or 0.0
                if left == 0:
                    break
            await asyncio.sleep(0.2)
        return int(left), round(time.monotonic() - started, 1)

    async def large_run(self, long_every: int, *, profile: Path | None = None) -> LargeRun:
        """One closed loop, every `long_every`-th report a long call, on a fresh ingress;
        with `profile`, py-spy records the ingress meanwhile (its collapsed stacks there)."""
        o = self.o
        long = pool.long_call(o.sample)
        label = f"{1 / long_every:.0%} long" + "".join(f", {k}={v}" for k, v in o.env)
        ingress = await self.start_ingress("bench.large")
        try:
            size = min(POOL_SIZE, POOL_LONG * long_every)
            requests = self._mixed(long, long_every, size, ingress.port)
            script = pool.write_wrk_script(self.tmp / "wrk-large.lua", requests)
            mix = f"1 in {long_every} reports a {long.name}, the rest {self.short.name}"
            generator = f"wrk -t{o.threads} -c{o.connections} -d{round(o.duration)}s"
            self.say(f"large reports ({label}): {mix}, {generator}")
            await self._warm_up(script, ingress.port)
            names = (SPOOLED, ACK_MISSED, ACCEPTED)
            before = {n: await self._metric(ingress, n) or 0.0 for n in names}
            histograms = (ACK_SECONDS, FSYNC_SECONDS, PUBLISH_SECONDS)
            hist_before = {n: await self._histogram(ingress, n) for n in histograms}
            started = time.time()
            window = CpuWindow([ingress.watched(), self.broker])
            sampler = Sampler(functools.partial(self._metric, ingress, ACCEPTED))
            spy = None
            if profile is not None and (py_spy := profiling.find_py_spy()) is not None:
                spy = py_spy_record(py_spy, ingress.pid, round(o.duration) + 1, profile)
            async with sampler:
                run = await self._wrk(script, ingress.port, o.duration, o.connections)
            if spy is not None:
                await asyncio.to_thread(spy.stop, o.duration + 30, signal.SIGINT)
            window.close()
            after = {n: await self._metric(ingress, n) or 0.0 for n in names}
            hist_after = {n: await self._histogram(ingress, n) for n in histograms}
            spool_left, drain_s = await self._wait_drained(ingress)
        finally:
            await self._stop(ingress)
        data = wrk_summary(run)
        totals = WrkTotals.of_wrk(data)
        processes = window.usage(totals.good, [("wrk", run)])
        quantiles = {n: bucket_quantiles(hist_before[n], hist_after[n]) for n in histograms}
        fsyncs = hist_after[FSYNC_SECONDS].get(math.inf, 0.0) - hist_before[FSYNC_SECONDS].get(
            math.inf, 0.0
        )
        delta = {n: int(after[n] - before[n]) for n in names}
        latency = Latency.of_wrk(data)
        busy = sum(p.cpu_seconds for p in processes)
        ingress_core = _core_share(processes, "ingress", window.seconds)
        broker_core = _core_share(processes, "broker", window.seconds)
        result = LargeRun(
            label=label,
            env=dict(o.env),
            generator=generator,
            mix=mix,
            duration_s=round(totals.seconds, 2),
            requests=totals.requests,
            non_2xx=totals.non_2xx,
            socket_errors=totals.socket_errors,
            reports_per_s=totals.per_second,
            mb_per_s=round(totals.good * mean_body_bytes(requests) / totals.seconds / 1e6, 2),
            latency=latency,
            accepted=delta[ACCEPTED],
            spooled=delta[SPOOLED],
            ack_missed=delta[ACK_MISSED],
            spool_left=spool_left,
            drain_seconds=drain_s,
            kafka_ack=quantiles[ACK_SECONDS],
            spool_fsync=quantiles[FSYNC_SECONDS],
            publish=quantiles[PUBLISH_SECONDS],
            fsyncs=int(fsyncs),
            ingress_core=round(ingress_core, 2),
            broker_core=round(broker_core, 2),
            processes=processes,
            series=sampler.rates(started),
            bound=bound_of(
                accepted=delta[ACCEPTED],
                spooled=delta[SPOOLED],
                ack_missed=delta[ACK_MISSED],
                ingress_core=ingress_core,
                broker_core=broker_core,
                machine_cores=busy / window.seconds if window.seconds > 0 else math.nan,
                cpus=int(self.results.meta.get("cpus") or 0),
                ack_p50_ms=quantiles[ACK_SECONDS].get("p50_at_most_ms", math.nan),
                answer_p50_ms=latency.p50_ms,
            ),
        )
        self.say(
            f"  {result.reports_per_s:,.0f}/s  {result.mb_per_s:.1f} MB/s"
            f"  p50 {latency.p50_ms:.1f} ms  p99 {latency.p99_ms:.1f} ms"
            f"  spooled {result.spooled:,}  bound: {result.bound}"
        )
        return result
