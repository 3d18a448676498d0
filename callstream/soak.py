"""A soak run: steady load through the real processes while faults are injected, then an
account of every report. Not a test: run it by hand, it takes as long as you ask.

    callstream soak --minutes 10 [--rate 200] [--brokers 3] [--seed 7] [--keep]

It starts its own Kafka (one broker, or with --brokers 3 a three-node cluster, in a
temporary home), then the ingress and the storage consumer (SQLite) as `python -m
callstream ...` processes, exactly as they run in production, and posts signed reports at a
steady rate, each with a new call id. On a schedule, one fault at a time (none that
restarts the ingress or the storage consumer in the last third; the kinds:
callstream/soakfaults.py): SIGKILL and restart the ingress; SIGSTOP a broker and SIGCONT it
later; SIGKILL and restart the storage consumer; SIGKILL a broker and restart it 10-30 s
later; stop a broker gracefully and start it again; fill the spool's disk (a tmpfs of its
own) while Kafka is away, restarting the ingress on it; on a cluster, SIGKILL the leader of
partition 0. When the load stops it lets the pipeline settle (the spool drained, storage
caught up) and reports:

    sent          reports posted
    acknowledged  answered 2xx: the ingress promised it was durable
    stored        rows in storage (and which of them were never acknowledged)
    duplicates    acknowledged call ids on the topic more than once; storage's duplicates
    lost          acknowledged but not stored: must be 0, and the exit status says so
    spool         records left in the ingress's spool at the end: must be 0 too
    memory        the Python heap (allocated blocks, callstream_python_heap_blocks) and
                  the resident memory of the ingress and the storage consumer: cold (before
                  any report), baseline, peak (resident: VmHWM, the highest of their
                  incarnations) and end; the heap must end back at its baseline

The baseline is a warmed, idle process: --warm-up seconds of the same load with no fault,
then the same quiet the end gets (the load's replay window, one sweep, one heap trim). The
verdict is on the heap, not the resident memory: CPython hands an arena of small objects
back to the system only once every object in it is gone, so a process that has carried
200 reports/s keeps ~15-25 MiB above its cold start even with no fault at all (measured:
cold 63, after 3 fault-free minutes 80 MiB), while the objects it holds are back where they
started. A leak grows the heap; the resident memory's plateau is the allocator's. A
SIGKILL fault restarts a service, so the end is its last incarnation's: the report says
which, and how much of the fault phase it lived through.

The ingress spools to its tmpfs (CALLSTREAM_SPOOL_DIR), so a broker outage becomes
acknowledged-and-spooled, not 503s; only with the spool's disk full are reports refused.
Traffic goes only to 127.0.0.1, and every loop is bounded by --minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from callstream import progress
from callstream.bench.pool import sample_report
from callstream.bench.procstat import rss_kib
from callstream.ports import free_port
from callstream.sender import signed_headers
from callstream.soakfaults import (
    Brokers,
    Pipeline,
    Service,
    inject_faults,
    spool_disk,
    vm_hwm_kib,
)
from core import heap
from core.kafkasettings import KafkaSettings
from core.secret import Secret
from core.signing import WEBHOOK_PATH
from core.topicreader import read_topic

# More than this many unanswered requests means the ingress is not answering at all; the
# driver then counts the tick as skipped instead of piling up sockets without bound.
MAX_IN_FLIGHT = 2000
REQUEST_TIMEOUT = 30.0
# After the load: how long the pipeline may take to drain its spool and catch up, and how
# long without any progress counts as stuck.
SETTLE_MAX_SECONDS = 300.0
SETTLE_STUCK_SECONDS = 90.0
SIGNATURE_TOLERANCE_SECONDS = 30
# The replay window (twice the tolerance), then one sweep and one heap trim of the ingress.
MEMORY_SETTLE_SECONDS = 2 * SIGNATURE_TOLERANCE_SECONDS + 15.0
SAMPLE_EVERY = 1.0
# Allocator noise between two idle measurements of the same warmed process.
MEMORY_TOLERANCE = 0.10


@dataclass(frozen=True)
class Options:
    minutes: float
    rate: float
    seed: int
    keep: bool
    brokers: int
    first_fault_after: float
    gap: tuple[float, float]
    warm_up: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--minutes", type=_positive, default=10.0, help="load duration (default 10)"
    )
    parser.add_argument("--rate", type=_positive, default=200.0, help="reports per second (200)")
    parser.add_argument("--seed", type=int, default=None, help="fault schedule seed (random)")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory and logs")
    parser.add_argument(
        "--brokers", type=int, choices=(1, 3), default=1, help="Kafka nodes (1; 3: a cluster)"
    )
    parser.add_argument(
        "--first-fault-after", type=float, default=10.0, help="seconds before the first fault"
    )
    parser.add_argument(
        "--warm-up", type=_positive, default=60.0,
        help="seconds of load with no fault before the memory baseline (60)",
    )  # fmt: skip
    parser.add_argument(
        "--gap", type=float, nargs=2, default=(10.0, 20.0), metavar=("MIN", "MAX"),
        help="seconds between one fault's recovery and the next fault (10 20)",
    )  # fmt: skip


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def options_from(args: argparse.Namespace) -> Options:
    return Options(
        minutes=args.minutes,
        rate=args.rate,
        seed=args.seed if args.seed is not None else secrets.randbelow(2**31),
        keep=args.keep,
        brokers=args.brokers,
        first_fault_after=args.first_fault_after,
        gap=(min(args.gap), max(args.gap)),
        warm_up=args.warm_up,
    )


# -- load -------------------------------------------------------------------------------------


@dataclass
class Tally:
    sent: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    durable: Counter[str] = field(default_factory=Counter)


class Driver:
    """Posts signed reports at a steady rate (open loop: a slow answer does not slow the
    sending), one new call id each."""

    def __init__(self, url: str, secret: str, tally: Tally) -> None:
        self.url = url
        self.secret = Secret(secret)
        self.tally = tally
        self.template = sample_report()

    async def run(self, rate: float, until: float, label: str = "soak load") -> None:
        loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        tasks: set[asyncio.Task[None]] = set()
        async with (
            progress.over_time(label, until - loop.time()),
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        ):
            next_at = loop.time()
            while loop.time() < until:
                while next_at <= loop.time():
                    next_at += 1.0 / rate
                    if len(tasks) >= MAX_IN_FLIGHT:
                        self.tally.skipped += 1
                        continue
                    task = asyncio.create_task(self.send(session))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                await asyncio.sleep(max(0.0, next_at - loop.time()))
            if tasks:
                await asyncio.wait(tasks)

    async def send(self, session: aiohttp.ClientSession) -> None:
        call_id = str(uuid.uuid4())
        stamp = int(time.time() * 1000)
        body = orjson.dumps(self.template | {"callId": call_id, "eventTimestamp": stamp})
        headers = signed_headers(body, self.secret, None)
        self.tally.sent.add(call_id)
        try:
            async with session.post(self.url, data=body, headers=headers) as resp:
                answer = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.tally.errors[type(exc).__name__] += 1
            return
        self.tally.statuses[status] += 1
        if 200 <= status < 300:
            self.tally.acked.add(call_id)
            with contextlib.suppress(ValueError, AttributeError):
                self.tally.durable[str(orjson.loads(answer).get("durable", "kafka"))] += 1


# -- watching ---------------------------------------------------------------------------------


async def watch(p: Pipeline, stop: asyncio.Event) -> None:
    """Memory samples and restarts of unexpected exits, once a second."""
    while not stop.is_set():
        for service in (p.ingress, p.storage):
            service.check()
            service.sample()
        p.brokers.sample()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY)


# -- the account ----------------------------------------------------------------------------


class Scraper:
    """A counter from a service's /metrics, summed over its incarnations (each restart
    starts the counter again from zero)."""

    def __init__(self, service: Service, line_prefix: str) -> None:
        self.service = service
        self.prefix = line_prefix
        self.last: dict[int, float] = {}

    async def scrape(self, session: aiohttp.ClientSession) -> None:
        url = f"http://127.0.0.1:{self.service.port}/metrics"
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, ValueError):
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                for line in (await resp.text()).splitlines():
                    if line.startswith(self.prefix):
                        self.last[self.service.incarnation] = float(line.rsplit(" ", 1)[1])

    @property
    def total(self) -> int:
        return int(sum(self.last.values()))


async def scrape_forever(scrapers: list[Scraper], stop: asyncio.Event) -> None:
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            for scraper in scrapers:
                await scraper.scrape(session)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)
        for scraper in scrapers:
            await scraper.scrape(session)


def stored_ids(db: Path) -> set[str]:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return {row[0] for row in conn.execute("SELECT call_id FROM call_reports")}
    except sqlite3.Error:
        return set()


async def spool_depth(url: str) -> int | None:
    """Records still in the ingress's spool (None: no spool, or no answer)."""
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, ValueError):
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp,
        ):
            spool = (await resp.json()).get("spool")
            return int(spool["records"]) if isinstance(spool, dict) else 0
    return None


async def settle(p: Pipeline, tally: Tally, db: Path, readyz: str) -> float:
    """Wait until every acknowledged report is stored and the spool is empty, or until
    nothing moves for a while; seconds it took."""
    began = time.monotonic()
    best = -1
    progress_at = began
    while time.monotonic() - began < SETTLE_MAX_SECONDS:
        stored = len(tally.acked & await asyncio.to_thread(stored_ids, db))
        depth = await spool_depth(readyz)
        if stored == len(tally.acked) and depth == 0:
            break
        if stored > best:
            best, progress_at = stored, time.monotonic()
        elif time.monotonic() - progress_at > SETTLE_STUCK_SECONDS:
            break
        await asyncio.sleep(2.0)
    return time.monotonic() - began


async def topic_copies(kafka: KafkaSettings) -> Counter[str]:
    copies: Counter[str] = Counter()
    async for record in read_topic(kafka, kafka.topic, idle_timeout=10.0):
        if record.key is not None:
            copies[record.key.decode()] += 1
    return copies


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


@dataclass
class Memory:
    """By process: resident memory (KiB) and the Python heap (allocated blocks), cold (before
    any report), baseline (warmed and idle) and at the end (once everything settled)."""

    start: dict[str, int] = field(default_factory=dict)
    baseline: dict[str, int] = field(default_factory=dict)
    end: dict[str, int] = field(default_factory=dict)
    heap_start: dict[str, int] = field(default_factory=dict)
    heap_baseline: dict[str, int] = field(default_factory=dict)
    heap_end: dict[str, int] = field(default_factory=dict)
    # Per service: the incarnation measured at the end, and the seconds of the fault phase
    # it lived through (a SIGKILL fault restarts it; its predecessors' heaps are gone).
    lived: dict[str, tuple[int, float]] = field(default_factory=dict)

    def not_back(
        self, roles: tuple[str, ...] = ("ingress", "storage"), tolerance: float = MEMORY_TOLERANCE
    ) -> dict[str, tuple[int, int]]:
        """(baseline, end) heap blocks of each service whose heap ended above its baseline by
        more than `tolerance`, or could not be read (the driver is not judged: it holds every
        call id it sent for the account)."""
        return {
            role: (self.heap_baseline.get(role, 0), self.heap_end.get(role, 0))
            for role in roles
            if not self.heap_baseline.get(role)
            or not self.heap_end.get(role)
            or self.heap_end[role] > self.heap_baseline[role] * (1 + tolerance)
        }


async def measure(services: tuple[Service, ...]) -> tuple[dict[str, int], dict[str, int]]:
    """Resident memory in KiB (the driver's too), and each service's
    callstream_python_heap_blocks (0: no answer)."""
    resident = {s.role: s.rss_kib() for s in services} | {"driver": rss_kib(os.getpid()) or 0}
    blocks: dict[str, int] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for service in services:
            blocks[service.role] = 0
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, ValueError):
                url = f"http://127.0.0.1:{service.port}/metrics"
                async with session.get(url) as resp:
                    for line in (await resp.text()).splitlines():
                        if line.startswith(f"{heap.NAME} "):
                            blocks[service.role] = int(float(line.rsplit(" ", 1)[1]))
    return resident, blocks


async def soak(opts: Options) -> int:
    home = Path(tempfile.mkdtemp(prefix="callstream-soak-"))
    logs = home / "logs"
    logs.mkdir()
    run_id = uuid.uuid4().hex[:8]
    topic = f"soak.{run_id}.end-of-call-report"
    secret = secrets.token_hex(16)
    db = home / "storage.db"
    print(
        f"callstream soak: {opts.minutes:g} min at {opts.rate:g}/s, {opts.brokers} broker(s),"
        f" seed {opts.seed}, home {home}",
        flush=True,
    )
    with spool_disk(home / "spool-disk") as disk:
        code = await _soak(opts, home, logs, topic, secret, db, disk)
    # Only once the tmpfs is unmounted: removed under it, the mount point would stay.
    if not opts.keep:
        shutil.rmtree(home, ignore_errors=True)
    return code


async def _soak(
    opts: Options, home: Path, logs: Path, topic: str, secret: str, db: Path, disk: Path | None
) -> int:
    brokers = Brokers(home / "kafka", opts.brokers)
    await brokers.start()
    ingress_port, storage_port = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CALLSTREAM_")},
        **brokers.env(),
        "CALLSTREAM_TOPIC": topic,
        "CALLSTREAM_EVENTS_TOPIC": topic.replace("end-of-call-report", "events"),
        "CALLSTREAM_WEBHOOK_SECRET": secret,
        "CALLSTREAM_INGRESS_HOST": "127.0.0.1",
        "CALLSTREAM_INGRESS_PORT": str(ingress_port),
        "CALLSTREAM_METRICS_HOST": "127.0.0.1",
        "CALLSTREAM_STORAGE_PORT": str(storage_port),
        "CALLSTREAM_SQLITE_PATH": str(db),
        "CALLSTREAM_HOME": str(home),
        "CALLSTREAM_SPOOL_DIR": str((disk or home) / "spool"),
        # One process: the faults SIGKILL the ingress's pid and fill its spool directory.
        "CALLSTREAM_INGRESS_WORKERS": "1",
        # The ingress remembers each signed delivery's answer for twice this (replay
        # detection): short enough that the memory at the end is measured after it passed.
        "CALLSTREAM_SIGNATURE_TOLERANCE_SECONDS": str(SIGNATURE_TOLERANCE_SECONDS),
    }
    ingress = Service("ingress", ["ingress"], env, logs, ingress_port)
    storage = Service("storage", ["consumer", "storage"], env, logs, storage_port)
    p = Pipeline(brokers, ingress, storage, topic, time.monotonic(), disk)
    tally = Tally()
    memory = Memory()
    stop_watching = asyncio.Event()
    scrapers = [
        Scraper(storage, "callstream_storage_duplicates_total"),
        Scraper(ingress, "callstream_ingress_spool_writes_total "),
    ]
    readyz = f"http://127.0.0.1:{ingress_port}/readyz"
    background: list[asyncio.Task[None]] = []
    try:
        ingress.start()
        storage.start()
        await _until_ready(readyz)
        background = [
            asyncio.create_task(watch(p, stop_watching)),
            asyncio.create_task(scrape_forever(scrapers, stop_watching)),
        ]
        loop = asyncio.get_running_loop()
        memory.start, memory.heap_start = await measure((ingress, storage))
        driver = Driver(f"http://127.0.0.1:{ingress_port}{WEBHOOK_PATH}", secret, tally)
        await driver.run(opts.rate, loop.time() + opts.warm_up, "soak warm-up")
        print("  warm-up done; quiet until the memory baseline", flush=True)
        await asyncio.sleep(MEMORY_SETTLE_SECONDS)
        memory.baseline, memory.heap_baseline = await measure((ingress, storage))
        until = loop.time() + opts.minutes * 60
        p.started = time.monotonic()
        faults = asyncio.create_task(
            inject_faults(p, opts.seed, opts.first_fault_after, opts.gap, until)
        )
        await driver.run(opts.rate, until)
        p.load_stopped = time.monotonic()
        await faults  # a fault under way finishes its recovery
        print(f"  load stopped after {len(tally.sent)} reports; settling", flush=True)
        settled = await settle(p, tally, db, readyz)
        spool_left = await spool_depth(readyz)
        # Memory "at the end" is once the load's remembered answers have expired and the
        # ingress had a chance to hand the freed heap back.
        await asyncio.sleep(max(0.0, p.load_stopped + MEMORY_SETTLE_SECONDS - time.monotonic()))
        memory.end, memory.heap_end = await measure((ingress, storage))
        memory.lived = {
            s.role: (s.incarnation, max(0.0, p.load_stopped - max(s.started_at, p.started)))
            for s in (ingress, storage)
        }
        stop_watching.set()
        await asyncio.gather(*background)
        copies = await topic_copies(brokers.kafka(topic))
    finally:
        stop_watching.set()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        ingress.stop()
        storage.stop()
        brokers.stop()
    return _account(
        opts, p, tally, db, copies, scrapers, settled, home, memory=memory, spool_left=spool_left
    )


async def _until_ready(readyz: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(readyz) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.5)
    raise SystemExit(f"the ingress never became ready ({readyz})")


def _account(
    opts: Options,
    p: Pipeline,
    tally: Tally,
    db: Path,
    copies: Counter[str],
    scrapers: list[Scraper],
    settled: float,
    home: Path,
    *,
    memory: Memory,
    spool_left: int | None,
) -> int:
    services = (p.ingress, p.storage)
    peaks = {"broker": p.brokers.peak_kib} | {s.role: s.peak_kib for s in services}
    peaks["driver"] = vm_hwm_kib(os.getpid())
    stored = stored_ids(db) & tally.sent
    lost = tally.acked - stored
    duplicated = {key: n for key, n in copies.items() if key in tally.acked and n > 1}
    refused = {str(status): n for status, n in sorted(tally.statuses.items()) if status >= 300}
    summary: dict[str, Any] = {
        "minutes": opts.minutes,
        "rate": opts.rate,
        "seed": opts.seed,
        "faults": p.faults,
        "sent": len(tally.sent),
        "acknowledged": len(tally.acked),
        "acknowledged_by": dict(tally.durable),
        "refused": refused,
        "no_answer": dict(tally.errors),
        "skipped_client_saturated": tally.skipped,
        "stored": len(stored),
        "stored_without_acknowledgement": len(stored - tally.acked),
        "duplicates_on_topic_call_ids": len(duplicated),
        "duplicates_on_topic_extra_copies": sum(n - 1 for n in duplicated.values()),
        "duplicates_absorbed_by_storage": scrapers[0].total,
        "spool_writes": scrapers[1].total,
        "lost": len(lost),
        "lost_call_ids": sorted(lost)[:20],
        "spool_records_at_end": spool_left,
        "settle_seconds": round(settled, 1),
        "unexpected_exits": {s.role: s.unexpected_exits for s in services},
        "brokers": opts.brokers,
        "memory_kib": {
            "start": memory.start,
            "baseline": memory.baseline,
            "peak": peaks,
            "end": memory.end,
        },
        "heap_blocks": {
            "start": memory.heap_start,
            "baseline": memory.heap_baseline,
            "end": memory.heap_end,
            "end_incarnation_and_fault_seconds_lived": memory.lived,
        },
        "incarnations": {
            "broker": p.brokers.incarnation,
            **{s.role: s.incarnation for s in services},
        },
    }
    rows = [
        ("reports sent", f"{len(tally.sent)}"),
        (
            "acknowledged (2xx)",
            f"{len(tally.acked)}  ({', '.join(f'{k}: {v}' for k, v in tally.durable.items())})",
        ),
        ("refused", ", ".join(f"{k}: {v}" for k, v in refused.items()) or "none"),
        ("no answer", ", ".join(f"{k}: {v}" for k, v in tally.errors.items()) or "none"),
        ("stored", f"{len(stored)}  ({len(stored - tally.acked)} of them never acknowledged)"),
        (
            "duplicates absorbed",
            f"{len(duplicated)} acknowledged call ids on the topic more than once "
            f"({summary['duplicates_on_topic_extra_copies']} extra copies); "
            f"storage counted {scrapers[0].total} duplicates",
        ),
        ("spooled by the ingress", f"{scrapers[1].total}"),
        ("LOST (acked, not stored)", f"{len(lost)}"),
        ("spool at the end", "no answer" if spool_left is None else f"{spool_left} records"),
        *(
            (
                f"heap blocks, {role}",
                f"cold {memory.heap_start.get(role, 0):,}, "
                f"baseline {memory.heap_baseline.get(role, 0):,}, "
                f"end {memory.heap_end.get(role, 0):,} (incarnation {memory.lived[role][0]},"
                f" through {memory.lived[role][1]:.0f} of {p.load_stopped - p.started:.0f} s"
                " of faults)",
            )
            for role in ("ingress", "storage")
        ),
        *(
            (
                f"memory, {role}",
                f"cold {mib(memory.start.get(role, 0))}, "
                f"baseline {mib(memory.baseline.get(role, 0))}, peak {mib(peaks[role])}, "
                f"end {mib(memory.end.get(role, 0))}",
            )
            for role in ("ingress", "storage", "driver")
        ),
        ("peak memory, broker", mib(p.brokers.peak_kib)),
        ("settled in", f"{settled:.0f} s"),
    ]
    print("\nfaults:")
    for line in p.faults:
        print(f"  {line}")
    print()
    for name, value in rows:
        print(f"{name:<26} {value}")
    for service in services:
        if service.unexpected_exits:
            print(f"{service.role} exited by itself with {service.unexpected_exits}")
    (home / "soak-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if opts.keep:
        print(f"\nkept: {home} (logs/, storage.db, soak-summary.json)")
    if lost:
        print(
            f"\nFAILED: {len(lost)} acknowledged report(s) were not stored, e.g. {sorted(lost)[:5]}"
        )
        return 1
    if spool_left != 0:
        print(f"\nFAILED: the spool did not drain ({spool_left} records left)")
        return 1
    if not_back := memory.not_back():
        for role, (base, end) in not_back.items():
            print(
                f"\nFAILED: the {role}'s heap did not return to its baseline "
                f"({base:,} blocks warmed and idle, {end:,} at the end)"
            )
        return 1
    return 0
