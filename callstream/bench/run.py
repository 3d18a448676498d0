"""The bench itself: start everything on loopback, drive load, measure, stop everything.

Phases, in order (each server is the same process a deployment runs, started as a child):

1. closed loop: wrk against the bare aiohttp ceiling, the naive implementation and the
   ingress, once with the sample report and once with a ~60 kB transcript;
2. fixed rate: the open-loop client at --rate against the ingress while the storage
   consumer (SQLite) writes every report; end-to-end delay per report;
3. catch-up and replay: a topic pre-filled with --catchup-records reports, read by the
   storage consumer with a fresh group into SQLite and into PostgreSQL; replay is the same
   again with another fresh group, over the rows already there;
4. the spool path (Kafka unreachable);
5. the spool drain: a spool of --drain-records reports emptied by an ingress with Kafka back;
6. large reports: a closed loop where every --long-every-th report is a long call (~59 kB),
   with the figures that say where the bound is (callstream/bench/large.py);
7. with --profile: py-spy on the ingress under wrk, and on the consumer while it catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import math
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from callstream.bench import openloop, pool, profiling
from callstream.bench.chart import write_chart
from callstream.bench.harness import PARTITIONS
from callstream.bench.large import ACCEPTED, PUBLISH_SECONDS, SPOOL_RECORDS, SPOOLED, LargeReports
from callstream.bench.options import BenchOptions
from callstream.bench.procstat import Watched, loadavg
from callstream.bench.report import (
    ConsumerRun,
    DrainRun,
    Latency,
    WrkRun,
    WrkTotals,
    evaluate,
    render_table,
    run_meta,
    write_json,
)
from callstream.bench.services import (
    HOST,
    CpuWindow,
    Measured,
    Sampler,
    Service,
    bucket_quantiles,
    postgres_count,
    py_spy_record,
    run_measured,
    say,
    smooth,
    sqlite_count,
    stored_times,
    wrk_summary,
)
from callstream.localpg import PostgresServer
from callstream.ports import free_port
from callstream.progress import track
from core.kafkasettings import KafkaSettings
from ingress.kafkapublisher import KafkaPublisher
from ingress.publisher import OutgoingRecord, encode_record
from ingress.spool import Spool
from schemas.codec import single_object_encoder
from schemas.headers import RecordHeaders
from schemas.normalise import normalise
from schemas.store import END_OF_CALL_REPORT, default_store

_HANDLED = 'callstream_consumer_records_handled_total{consumer="storage"}'
_LAST_COMMIT = 'callstream_consumer_last_commit_timestamp_seconds{consumer="storage"}'
_DRAINED = "callstream_ingress_spool_drained_total"
DRAIN_GIVE_UP_SECONDS = 600.0
_REQUEST_SECONDS = "callstream_ingress_request_duration_seconds"


class Bench(LargeReports):
    async def closed_loop(
        self,
        server: str,
        label: str,
        service: Service,
        template: pool.BodyTemplate,
        count: Callable[[], Awaitable[float | None]],
        watched: Sequence[Watched],
    ) -> WrkRun:
        o = self.o
        generator = f"wrk -t{o.threads} -c{o.connections} -d{round(o.duration)}s"
        self.say(f"closed loop: {label}, {template.name}, {generator}")
        script = self._wrk_script(server, template, service.port)
        await self._warm_up(script, service.port)
        started = time.time()
        window = CpuWindow(watched)
        async with Sampler(count) as sampler:
            run = await self._wrk(script, service.port, o.duration, o.connections)
        window.close()
        data = wrk_summary(run)
        totals = WrkTotals.of_wrk(data)
        counted = sampler.delta()
        result = WrkRun(
            server=server,
            label=label,
            body=template.name,
            body_bytes=template.size,
            generator=generator,
            duration_s=round(totals.seconds, 2),
            requests=totals.requests,
            non_2xx=totals.non_2xx,
            socket_errors=totals.socket_errors,
            reports_per_s=totals.per_second,
            server_counted=int(counted) if counted is not None else None,
            latency=Latency.of_wrk(data),
            processes=window.usage(totals.good, [("wrk", run)]),
            series=sampler.rates(started),
        )
        self.say(
            f"  {result.reports_per_s:,.0f}/s  p50 {result.latency.p50_ms:.1f} ms  "
            f"p99 {result.latency.p99_ms:.1f} ms  non-2xx {result.non_2xx}"
        )
        return result

    async def phase_baselines(self) -> None:
        for kind, label in (("bare", "bare aiohttp (ceiling)"), ("naive", "naive aiokafka")):
            service = await self.start_baseline(kind)
            watched = [service.watched()] + ([self.broker] if kind == "naive" else [])
            count = functools.partial(self._bench_count, service)
            for template in (self.short, self.long):
                run = await self.closed_loop(kind, label, service, template, count, watched)
                self.results.wrk.append(run)
            await self._stop(service)

    async def phase_ingress(self) -> None:
        """One worker, then two (CALLSTREAM_INGRESS_WORKERS): what one core's worth gives,
        and how much a second adds. CPU is the ingress's whole process tree."""
        for workers in (1, 2):
            server = "ingress" if workers == 1 else f"ingress-{workers}w"
            label = "callstream ingress" if workers == 1 else f"ingress, {workers} workers"
            ingress = await self.start_ingress(f"bench.{server}", workers=workers)
            accepted = functools.partial(self._metric, ingress, ACCEPTED)
            watched = [ingress.watched(), self.broker]
            for template in (self.short, self.long):
                run = await self.closed_loop(server, label, ingress, template, accepted, watched)
                self.results.wrk.append(dataclasses.replace(run, workers=workers))
            await self._stop(ingress)

    # -- fixed rate: the open-loop client -----------------------------------------------------

    async def _open_loop(
        self, requests: Sequence[pool.SignedRequest], port: int, name: str
    ) -> tuple[dict[str, Any], Measured]:
        pool_path = self.tmp / f"{name}.pool"
        out_path = self.tmp / f"{name}.json"
        await asyncio.to_thread(pool.write_pool_file, pool_path, requests)
        argv = [sys.executable, "-m", "callstream.bench.openloop", str(pool_path), str(out_path)]
        argv += ["--rate", str(self.o.rate), "--port", str(port)]
        run = await asyncio.to_thread(run_measured, argv)
        if run.exit_code != 0:
            raise RuntimeError(f"the open-loop client failed (exit {run.exit_code}):\n{run.output}")
        data: dict[str, Any] = orjson.loads(await asyncio.to_thread(out_path.read_bytes))
        return data, run

    async def _wait_handled(self, consumer: Service, target: float, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                if (await self._metric(consumer, _HANDLED) or 0.0) >= target:
                    return
            await asyncio.sleep(0.1)

    async def _write_stats(self, consumer: Service) -> tuple[float, float] | None:
        series = 'callstream_storage_write_duration_seconds_%s{backend="sqlite"}'
        with contextlib.suppress(aiohttp.ClientError, OSError):
            total = await self._metric(consumer, series % "sum")
            count = await self._metric(consumer, series % "count")
            if total is not None and count is not None:
                return total, count
        return None

    async def phase_fixed_rate(self) -> None:
        topic = "bench.e2e"
        await self._ensure_topic(topic)
        db = self.tmp / "e2e.db"
        consumer = self._consumer(topic, "bench-e2e", {"CALLSTREAM_SQLITE_PATH": str(db)})
        await self._wait_http(consumer, "/healthz")
        ingress = await self.start_ingress(topic)
        o = self.o
        mix = f"every {o.long_every}th report long" if o.long_every else "sample reports only"
        self.say(f"fixed rate: {o.rate:,.0f}/s for {o.rate_duration:.0f} s, {mix}")
        warm = self._mixed(
            self.long, o.long_every, max(1, int(o.rate * max(o.warmup, 1.0))), ingress.port
        )
        await self._open_loop(warm, ingress.port, "openloop-warmup")
        await self._wait_handled(consumer, await self._metric(ingress, ACCEPTED) or 0.0, 60.0)

        requests = self._mixed(self.long, o.long_every, int(o.rate * o.rate_duration), ingress.port)
        started = time.time()
        writes_before = await self._write_stats(consumer)
        histograms = {
            "ingress request (server side)": _REQUEST_SECONDS,
            "Kafka acknowledgement (publish)": PUBLISH_SECONDS,
        }
        server_before = {k: await self._histogram(ingress, n) for k, n in histograms.items()}
        window = CpuWindow([ingress.watched(), self.broker, consumer.watched()])
        async with Sampler(functools.partial(self._metric, consumer, _HANDLED)) as stored:
            data, run = await self._open_loop(requests, ingress.port, "openloop")
            accepted = await self._metric(ingress, ACCEPTED) or 0.0
            await self._wait_handled(consumer, accepted, 120.0)
        window.close()
        server_after = {k: await self._histogram(ingress, n) for k, n in histograms.items()}
        writes_after = await self._write_stats(consumer)
        stored_at = await asyncio.to_thread(stored_times, db)
        await self._stop(ingress)
        await self._stop(consumer)

        fixed = openloop.summarise(
            data,
            [r.call_id for r in requests],
            [self.long.name if len(r.raw) > self.long.size else self.short.name for r in requests],
            stored_at,
            offered=o.rate,
            duration=o.rate_duration,
            mix=mix,
        )
        write_mean = None
        if writes_before is not None and writes_after is not None:
            batches = writes_after[1] - writes_before[1]
            if batches > 0:
                write_mean = round((writes_after[0] - writes_before[0]) / batches * 1000, 2)
        fixed = dataclasses.replace(
            fixed,
            storage_write_mean_ms=write_mean,
            processes=window.usage(fixed.ok, [("openloop", run)]),
            stored_series=stored.rates(started),
            server_side={k: bucket_quantiles(server_before[k], v) for k, v in server_after.items()},
        )
        self.results.fixed_rate = fixed
        lat = fixed.latency
        self.say(
            f"  {fixed.ok:,} ok, {fixed.failed} failed; p50 {lat.p50_ms:.1f} ms  "
            f"p99 {lat.p99_ms:.1f} ms  max {lat.max_ms:.1f} ms"
        )

    # -- catch-up and replay ------------------------------------------------------------------

    def report_records(self, topic: str, count: int) -> Iterator[list[OutgoingRecord]]:
        """`count` records of the sample report, encoded as the ingress encodes them, each its
        own call, in lists of at most 5,000."""
        payload = orjson.loads(self.short.body)
        event = normalise(payload, received_at_ms=int(time.time() * 1000), request_id="bench")
        assert event.record is not None
        assert event.call_id is not None
        encoder = single_object_encoder(default_store().current(END_OF_CALL_REPORT))
        value = encoder.encode(event.record)
        marker = event.call_id.encode()
        if value.count(marker) != 1:
            raise RuntimeError("the call id placeholder is not unique in the encoded record")
        headers = RecordHeaders(
            event.event_type, encoder.schema_id, encoder.wire_format, event.source_format, "bench"
        ).encode()
        self.say(f"{count:,} reports for {topic} ({len(value):,} bytes of Avro each)")
        for first in range(0, count, 5000):
            keys = [str(uuid.uuid4()).encode() for _ in range(min(5000, count - first))]
            yield [OutgoingRecord(topic, k, value.replace(marker, k), headers) for k in keys]

    async def consumer_run(
        self,
        kind: str,
        backend: str,
        topic: str,
        database: Mapping[str, str],
        count_rows: Callable[[], Awaitable[int]],
        extra: Sequence[Watched],
        *,
        profile: Path | None = None,
    ) -> ConsumerRun:
        expected = self.o.catchup_records
        group = f"bench-{kind}-{backend}-{uuid.uuid4().hex[:8]}"
        self.say(f"{kind}: storage consumer into {backend}, fresh group {group}")
        spawned = time.time()
        consumer = self._consumer(topic, group, database)
        await self._wait_http(consumer, "/healthz")
        spy = None
        if profile is not None and (py_spy := profiling.find_py_spy()) is not None:
            spy = py_spy_record(py_spy, consumer.pid, 600, profile)
        window = CpuWindow([consumer.watched(), self.broker, *extra])
        points: list[tuple[float, float]] = []
        deadline = time.monotonic() + max(120.0, expected / 1000)
        handled = 0.0
        note = ""
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                handled = await self._metric(consumer, _HANDLED) or 0.0
                points.append((time.time(), handled))
            if handled >= expected:
                break
            if time.monotonic() > deadline:
                note = f"timed out with {handled:,.0f} of {expected:,} handled"
                break
            if (code := consumer.poll()) is not None:
                note = f"consumer exited with {code}"
                break
            await asyncio.sleep(0.1)
        # The last batch's commit lands just after its records count as handled.
        await asyncio.sleep(0.5)
        last_commit = await self._metric(consumer, _LAST_COMMIT) or time.time()
        window.close()
        if spy is not None:
            await asyncio.to_thread(spy.stop, 30.0, signal.SIGINT)
        rows = await count_rows()
        await self._stop(consumer)
        first = next(((t, v) for t, v in points if v > 0), None)  # the first records handled
        if first is None or last_commit <= first[0]:
            seconds = rate = math.nan
        else:
            seconds = last_commit - first[0]
            rate = (handled - first[1]) / seconds
        series = [
            (round(t1 - spawned, 2), round((v1 - v0) / (t1 - t0), 1))
            for (t0, v0), (t1, v1) in itertools.pairwise(points)
            if t1 > t0
        ]
        run = ConsumerRun(
            kind=kind,
            backend=backend,
            records=expected,
            handled=int(handled),
            rate_per_s=round(rate, 1),
            seconds=round(seconds, 2),
            wall_seconds=round(last_commit - spawned, 2),
            rows=rows,
            processes=window.usage(int(handled)),
            series=smooth(series, 0.5),
            note=note,
        )
        self.say(f"  {run.rate_per_s:,.0f} records/s, {run.rows:,} rows")
        return run

    async def _filled_topic(self) -> str:
        """The catch-up topic, filled with --catchup-records reports the first time."""
        topic = "bench.catchup"
        if self.results.produce_rate_per_s is not None:
            return topic
        await self._ensure_topic(topic)
        publisher = KafkaPublisher(
            KafkaSettings(self.bootstrap, topic=topic, partitions=PARTITIONS),
            client_id="callstream-bench-fill",
        )
        await publisher.start()
        started = time.perf_counter()
        try:
            await publisher.wait_connected(30.0)
            for records in self.report_records(topic, self.o.catchup_records):
                await asyncio.gather(*(publisher.publish(r, 60.0) for r in records))
        finally:
            await publisher.stop()
        rate = self.o.catchup_records / (time.perf_counter() - started)
        self.say(f"  filled at {rate:,.0f}/s")
        self.results.produce_rate_per_s = round(rate, 1)
        return topic

    async def phase_catch_up(self) -> None:
        topic = await self._filled_topic()
        for backend in self._backends():
            database, rows, extra = await self._storage(backend, "catchup")
            for kind in ("catch-up", "replay"):
                run = await self.consumer_run(kind, backend, topic, database, rows, extra)
                self.results.consumers.append(run)

    def _backends(self) -> tuple[str, ...]:
        return ("sqlite", "postgresql") if self.o.postgres else ("sqlite",)

    async def _storage(
        self, backend: str, name: str
    ) -> tuple[dict[str, str], Callable[[], Awaitable[int]], list[Watched]]:
        """A new database for the storage consumer: its environment, how to count its rows,
        and the processes besides the consumer to watch."""
        if backend == "sqlite":
            db = self.tmp / f"{name}.db"
            rows = functools.partial(asyncio.to_thread, sqlite_count, db)
            return {"CALLSTREAM_SQLITE_PATH": str(db)}, rows, []
        if self.postgres is None:
            self.say("starting a throwaway PostgreSQL cluster")
            self.postgres = PostgresServer(self.tmp / "pg")
            await asyncio.to_thread(self.postgres.start)
        dsn = await asyncio.to_thread(self.postgres.create_database, f"callstream_{name}")
        assert self.postgres.pid is not None
        postgres = Watched("postgres", self.postgres.pid, tree=True)
        return {"CALLSTREAM_DATABASE_URL": dsn}, functools.partial(postgres_count, dsn), [postgres]

    async def phase_spool(self) -> None:
        # Kafka unreachable (a port nothing listens on): once the first reports have waited
        # out the ack deadline (shortened, so the warm-up covers it), every report goes
        # straight to the spool, fsync'd.
        service = await self.start_ingress(
            "bench.spool",
            KAFKA_BOOTSTRAP_SERVERS=f"{HOST}:{free_port()}",
            CALLSTREAM_KAFKA_ACK_DEADLINE_SECONDS="0.1",
        )
        count = functools.partial(self._metric, service, SPOOLED)
        try:
            run = await self.closed_loop(
                "spool", "ingress, Kafka down", service, self.short, count, [service.watched()]
            )
        finally:
            await self._stop(service)
        spooled = run.server_counted or 0
        good = run.requests - run.non_2xx
        if good and spooled >= 0.95 * good:
            self.results.spool = run
        else:
            self.results.spool_note = (
                f"not measured: {good:,} reports accepted with Kafka unreachable but only "
                f"{spooled:,} counted by {SPOOLED}"
            )

    async def phase_drain(self) -> None:
        """A spool left behind by a run with Kafka away (written here through the spool
        itself, as that run would have), then an ingress started with Kafka back: how fast
        its drainer empties the spool."""
        topic, name = "bench.drain", "ingress-drain"
        count = self.o.drain_records
        await self._ensure_topic(topic)
        spool = Spool(self.tmp / f"spool-{name}", max_bytes=1 << 40, max_age_seconds=86_400)
        await spool.open()
        started = time.perf_counter()
        try:
            for records in self.report_records(topic, count):
                await asyncio.gather(*(spool.append(encode_record(r)) for r in records))
        finally:
            await spool.close()
        fill_rate = count / (time.perf_counter() - started)
        self.say(f"drain: {count:,} reports spooled at {fill_rate:,.0f}/s; starting the ingress")
        spawned = time.monotonic()
        service = await self.start_ingress(topic)
        try:
            first: tuple[float, float] | None = None  # (when, drained by then)
            while True:
                # What is left first: a record leaves the spool no earlier than it is counted
                # drained, so a later read of the count holds every record already gone.
                left = await self._metric(service, SPOOL_RECORDS)
                drained = await self._metric(service, _DRAINED) or 0.0
                now = time.monotonic()
                if first is None and drained > 0:
                    first = (now, drained)
                if left == 0 and first is not None:
                    break
                if now - spawned > DRAIN_GIVE_UP_SECONDS:
                    raise RuntimeError(
                        f"the spool still held {left} reports after {now - spawned:.0f} s"
                    )
                await asyncio.sleep(0.05)
        finally:
            await self._stop(service)
        if drained < count:
            raise RuntimeError(f"{count:,} reports spooled but {drained:,.0f} drained")
        assert first is not None
        seconds = max(now - first[0], 1e-3)
        rate = (count - first[1]) / seconds
        self.results.drain = DrainRun(
            records=count,
            seconds=round(seconds, 2),
            rate_per_s=round(rate, 1),
            from_start_seconds=round(now - spawned, 2),
            fill_per_s=round(fill_rate, 1),
        )
        self.say(f"  drained at {rate:,.0f}/s ({now - spawned:.1f} s from the ingress's start)")

    async def phase_profile(self) -> None:
        py_spy = profiling.find_py_spy()
        if py_spy is None:
            self.results.profile = {"note": "py-spy is not installed (pip install -e '.[bench]')"}
            return
        profiles: dict[str, Any] = {}
        ingress = await self.start_ingress("bench.profile")
        seconds = max(1, round(self.o.profile_seconds))
        self.say(f"profile: py-spy on the ingress for {seconds} s under wrk")
        script = self._wrk_script("profile", self.short, ingress.port)
        await self._wrk(script, ingress.port, 2, 32)
        collapsed = Path(f"{self.out_prefix}-ingress.collapsed")
        collapsed.parent.mkdir(parents=True, exist_ok=True)
        spy = py_spy_record(py_spy, ingress.pid, seconds + 1, collapsed)
        try:
            run = await self._wrk(script, ingress.port, seconds, self.o.connections)
        finally:
            await asyncio.to_thread(spy.stop, seconds + 30, signal.SIGINT)
        await self._stop(ingress)
        profiles["ingress"] = self._profile_summary(collapsed, run)

        # Where a long call's CPU goes (JSON, Avro, compression on the event loop).
        collapsed = Path(f"{self.out_prefix}-ingress-large.collapsed")
        self.say("profile: py-spy on the ingress under long calls only")
        large = await self.large_run(1, profile=collapsed)
        summary = self._profile_summary(collapsed, None)
        summary["reports_per_s_while_profiled"] = large.reports_per_s
        profiles["ingress-large"] = summary

        topic = await self._filled_topic()
        for backend in self._backends():
            collapsed = Path(f"{self.out_prefix}-consumer-{backend}.collapsed")
            database, rows, extra = await self._storage(backend, "profile")
            run_ = await self.consumer_run(
                "catch-up (profiled)", backend, topic, database, rows, extra, profile=collapsed
            )
            summary = self._profile_summary(collapsed, None)
            summary["records_per_s_while_profiled"] = run_.rate_per_s
            profiles[f"consumer-{backend}"] = summary
        self.results.profile = profiles

    def _profile_summary(self, collapsed: Path, run: Measured | None) -> dict[str, Any]:
        if not collapsed.exists():
            return {"note": "py-spy wrote nothing (is ptrace allowed?)"}
        summary = profiling.summarise(collapsed)
        if run is not None:
            summary["reports_per_s_while_profiled"] = WrkTotals.of_wrk(wrk_summary(run)).per_second
        summary["collapsed_stacks"] = str(collapsed)
        say(f"{collapsed.name}\n{profiling.render(summary)}")
        return summary


@contextlib.asynccontextmanager
async def _temp_dir(keep: bool) -> AsyncIterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="callstream-bench-"))
    try:
        yield tmp
    finally:
        if keep:
            say(f"kept {tmp}")
        else:
            await asyncio.to_thread(shutil.rmtree, tmp, True)


async def run_bench(options: BenchOptions) -> int:
    if shutil.which("wrk") is None:
        say("wrk is not installed: run scripts/install-system-deps (or apt-get install wrk)")
        return 2
    if options.sample is not None and not options.sample.is_file():
        say(f"no sample report at {options.sample}: pass --sample FILE")
        return 2
    started_at = datetime.now(UTC)
    out_prefix = options.out_dir / started_at.strftime("%Y%m%dT%H%M%SZ")
    if (load := loadavg()[0]) > 0.5:
        say(f"note: load average {load:.2f} at start; other work on the machine skews figures")
    failure: BaseException | None = None
    async with (
        _temp_dir(options.keep_temp) as tmp,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
    ):
        bench = Bench(options, tmp, http, out_prefix)
        bench.results.meta = run_meta(options, started_at)
        phases: dict[str, Callable[[], Awaitable[None]]] = {
            "baselines": bench.phase_baselines,
            "ingress": bench.phase_ingress,
            "fixed-rate": bench.phase_fixed_rate,
            "catch-up": bench.phase_catch_up,
            "spool": bench.phase_spool,
            "drain": bench.phase_drain,
            "large": bench.phase_large,
            "profile": bench.phase_profile,
        }
        try:
            await bench.start_broker()
            with track("bench", len(options.phases), unit="phases") as bar:
                for phase in options.phases:
                    bar.describe(phase)
                    await phases[phase]()
                    bar.advance()
        except Exception as exc:
            failure = exc
            say(f"bench failed: {type(exc).__name__}: {exc}")
        finally:
            await bench.close()
    results = bench.results
    results.meta["seconds"] = round(time.monotonic() - bench.started, 1)
    results.meta["loadavg_end"] = loadavg()
    results.targets = evaluate(results)
    json_path = out_prefix.with_suffix(".json")
    write_json(results, json_path)
    try:
        chart_note = f", chart {write_chart(results, out_prefix.with_suffix('.png'))}"
    except ImportError:
        chart_note = " (no chart: pip install -e '.[bench]' for matplotlib)"
    print(render_table(results))
    print(f"\nresults {json_path}{chart_note}  ({results.meta['seconds']:.0f} s)")
    if failure is not None:
        raise failure
    return 0
