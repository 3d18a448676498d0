"""The ingress while Kafka fails: killed, hung, unreachable, and the ingress itself crashing.

Every test runs against its OWN broker (the session broker is shared and not ours to break),
on loopback. The oracle throughout: every report that got a 2xx ends up on the topic (a
duplicate is allowed: consumers are idempotent by call id, and the tests count them); no
report that got a 503 ever reaches the topic; per call id, first arrivals keep the order in
which the ingress acknowledged them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import CollectorRegistry

from callstream.localkafka import LocalKafka
from callstream.ports import free_port, free_ports
from callstream.processes import ChildProcess, callstream_argv
from core.kafkasettings import KafkaSettings
from core.secret import Secret
from core.signing import WEBHOOK_PATH
from ingress.settings import IngressSettings
from ingress.spool import CRASH_EXIT_CODE
from schemas.headers import RecordHeaders
from tests.conftest import TEST_SECRET, Client, start_ingress, wait_drained
from tests.signing import signed
from tests.support.disk import fill, set_read_only, small_disk
from tests.support.faultproxy import FaultProxy
from tests.support.kafka import private_broker
from tests.support.paths import REPO
from tests.support.produce import sample_report
from tests.support.topics import read_all

pytestmark = pytest.mark.slow

# Short, so a test spends little time waiting for Kafka to not answer.
ACK_DEADLINE = 1.0


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    with private_broker(tmp_path_factory.mktemp("fault-kafka") / "home") as local:
        yield local


def topics(bootstrap: str) -> KafkaSettings:
    suffix = uuid.uuid4().hex[:12]
    return KafkaSettings(
        bootstrap_servers=bootstrap,
        topic=f"faults.{suffix}.end-of-call-report",
        events_topic=f"faults.{suffix}.events",
    )


def settings_for(kafka: KafkaSettings, spool_dir: Path, **changes: Any) -> IngressSettings:
    base = IngressSettings(
        kafka=kafka,
        host="127.0.0.1",
        port=0,
        webhook_secrets=(Secret(TEST_SECRET),),
        kafka_ack_deadline_seconds=ACK_DEADLINE,
        spool_dir=spool_dir,
    )
    return replace(base, **changes)


@dataclass(frozen=True)
class Sent:
    request_id: str
    call_id: str
    status: int
    durable: str | None
    retry_after: str | None = None


def report(call_id: str, request_id: str = "") -> bytes:
    """A delivery of its own: two identical signed bodies in one second would be one
    delivery sent twice, which the ingress answers once."""
    payload = sample_report(call_id)
    payload["userMetadata"] = {"delivery": request_id}
    return orjson.dumps(payload)


async def post(
    http: aiohttp.ClientSession | Client, url: str, call_id: str, request_id: str
) -> Sent:
    body = report(call_id, request_id)
    headers = signed(body, TEST_SECRET) | {"X-Request-Id": request_id}
    async with http.post(url, data=body, headers=headers) as resp:
        answer = await resp.json(content_type=None)
        return Sent(
            request_id,
            call_id,
            resp.status,
            answer.get("durable"),
            resp.headers.get("Retry-After"),
        )


async def post_series(
    http: aiohttp.ClientSession | Client, url: str, prefix: str, count: int, calls: list[str]
) -> list[Sent]:
    """One at a time, round-robin over `calls`, so the acknowledgement order is known."""
    return [await post(http, url, calls[i % len(calls)], f"{prefix}-{i:04d}") for i in range(count)]


async def wait_durable(client: Client, durable: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (await (await client.get("/readyz")).json())["durable"] != durable:
        assert time.monotonic() < deadline, f"ingress never became durable via {durable}"
        await asyncio.sleep(0.1)


@dataclass(frozen=True)
class Landed:
    request_ids: list[str]  # in topic order per partition, partitions concatenated
    by_call: dict[str, list[str]]


async def landed(kafka: KafkaSettings) -> Landed:
    records = await read_all(kafka, kafka.topic)
    by_call: dict[str, list[str]] = {}
    ids = []
    for item in records:
        request_id = RecordHeaders.parse(item.raw.headers).request_id
        ids.append(request_id)
        assert item.raw.key is not None
        by_call.setdefault(item.raw.key.decode(), []).append(request_id)
    return Landed(ids, by_call)


def assert_all_acknowledged_landed(sent: list[Sent], got: Landed) -> int:
    """Every 2xx is on the topic, in order per call id (first arrivals); nothing that got a
    503 is. Returns the number of duplicates."""
    acknowledged = [s for s in sent if 200 <= s.status < 300]
    refused = {s.request_id for s in sent if s.status == 503}
    missing = {s.request_id for s in acknowledged} - set(got.request_ids)
    assert not missing, f"acknowledged but not on the topic: {sorted(missing)}"
    assert not refused & set(got.request_ids), "a report that got a 503 reached the topic"
    for call_id, ids in got.by_call.items():
        first_seen = list(dict.fromkeys(ids))
        expected = [s.request_id for s in acknowledged if s.call_id == call_id]
        assert [i for i in first_seen if i in set(expected)] == expected, call_id
    return len(got.request_ids) - len(set(got.request_ids))


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exposed")


@pytest.fixture
async def tracked_clients() -> AsyncIterator[list[Client]]:
    clients: list[Client] = []
    try:
        yield clients
    finally:
        for client in clients:
            await client.close()


async def test_killed_broker_spools_then_drains_in_order(
    broker: LocalKafka, tmp_path: Path, tracked_clients: list[Client]
) -> None:
    """Oracle: reports posted while the broker is SIGKILLed get 202 "spool"; after the broker
    restarts all of them (and those before) are on the topic in per-call order, the spool is
    empty and the metrics say so."""
    kafka = topics(broker.bootstrap)
    registry = CollectorRegistry()
    client = await start_ingress(settings_for(kafka, tmp_path / "spool"), registry)
    tracked_clients.append(client)
    await wait_durable(client, "kafka")
    calls = [str(uuid.uuid4()) for _ in range(3)]
    before = await post_series(client, WEBHOOK_PATH, "before", 6, calls)
    # A just-created topic may still be electing leaders: then even these are spooled.
    assert {s.status for s in before} == {202}
    await wait_drained(client)
    spooled_before = sum(s.durable == "spool" for s in before)

    broker.kill(signal.SIGKILL)
    try:
        during = await post_series(client, WEBHOOK_PATH, "down", 30, calls)
        assert {(s.status, s.durable) for s in during} == {(202, "spool")}
        state = await (await client.get("/readyz")).json()
        assert state["durable"] == "spool"
        assert state["spool"]["records"] == 30
        text = await (await client.get("/metrics")).text()
        assert metric(text, "callstream_ingress_spool_records") == 30
        assert metric(text, "callstream_ingress_spool_writes_total") == 30 + spooled_before
        assert metric(text, "callstream_ingress_spool_fsync_duration_seconds_count") >= 1
    finally:
        await asyncio.to_thread(broker.start, 120)

    after_restart = await post_series(client, WEBHOOK_PATH, "back", 3, calls)
    assert all(s.status == 202 for s in after_restart)
    await wait_drained(client)
    text = await (await client.get("/metrics")).text()
    assert metric(text, "callstream_ingress_spool_records") == 0
    assert metric(text, "callstream_ingress_spool_oldest_age_seconds") == 0
    spooled = spooled_before + 30 + sum(s.durable == "spool" for s in after_restart)
    assert metric(text, "callstream_ingress_spool_drained_total") == spooled
    duplicates = assert_all_acknowledged_landed(
        before + during + after_restart, await landed(kafka)
    )
    print(f"killed broker: {duplicates} duplicate(s)")


async def test_paused_broker_falls_back_within_the_deadline(
    broker: LocalKafka, tmp_path: Path, tracked_clients: list[Client]
) -> None:
    """Oracle: with the broker hung (SIGSTOP) every POST is answered 202 "spool" within the
    ack deadline plus a margin; after SIGCONT all of them reach the topic in per-call order."""
    kafka = topics(broker.bootstrap)
    client = await start_ingress(settings_for(kafka, tmp_path / "spool"))
    tracked_clients.append(client)
    await wait_durable(client, "kafka")
    calls = [str(uuid.uuid4()) for _ in range(2)]
    before = await post_series(client, WEBHOOK_PATH, "before", 4, calls)
    assert {s.status for s in before} == {202}
    await wait_drained(client)

    broker.pause()
    try:
        started = time.monotonic()
        during = await post_series(client, WEBHOOK_PATH, "hung", 20, calls)
        elapsed = time.monotonic() - started
    finally:
        broker.resume()
    assert {(s.status, s.durable) for s in during} == {(202, "spool")}
    # Only the first POST waits out the deadline; the rest queue behind it in the spool.
    print(f"paused broker: 20 reports answered in {elapsed:.2f} s")
    await wait_drained(client)
    duplicates = assert_all_acknowledged_landed(before + during, await landed(kafka))
    print(f"paused broker: {duplicates} duplicate(s)")


async def test_black_holed_broker_spools_then_drains_when_the_route_returns(
    tmp_path: Path, tracked_clients: list[Client]
) -> None:
    """Oracle: with the broker's port black-holed (connections open, no byte through) every
    POST still gets 202 "spool"; once bytes flow again every acknowledged report is on the
    topic in per-call order."""
    broker_port, proxy_port = free_ports(2)
    # The broker advertises the proxy, so every client connection (not only the bootstrap)
    # goes through it.
    local = LocalKafka(
        tmp_path / "kafka-home",
        port=broker_port,
        extra_config={"advertised.listeners": f"PLAINTEXT://127.0.0.1:{proxy_port}"},
    )
    proxy = FaultProxy(proxy_port, broker_port)
    await proxy.start()
    await asyncio.to_thread(local.start, 120)
    try:
        kafka = topics(f"127.0.0.1:{proxy_port}")
        client = await start_ingress(settings_for(kafka, tmp_path / "spool"))
        tracked_clients.append(client)
        await wait_durable(client, "kafka")
        calls = [str(uuid.uuid4()) for _ in range(2)]
        before = await post_series(client, WEBHOOK_PATH, "before", 4, calls)
        assert {s.status for s in before} == {202}
        await wait_drained(client)

        proxy.blackhole = True
        during = await post_series(client, WEBHOOK_PATH, "void", 12, calls)
        assert {(s.status, s.durable) for s in during} == {(202, "spool")}
        proxy.blackhole = False

        await wait_drained(client, timeout=120.0)
        duplicates = assert_all_acknowledged_landed(before + during, await landed(kafka))
        print(f"black-holed broker: {duplicates} duplicate(s)")
    finally:
        for tracked in tracked_clients:
            await tracked.close()
        tracked_clients.clear()
        await proxy.stop()
        await asyncio.to_thread(local.stop)


async def test_full_spool_answers_503_and_claims_nothing(
    broker: LocalKafka, tmp_path: Path, tracked_clients: list[Client]
) -> None:
    """Oracle: with Kafka unreachable and the spool at its byte bound, POSTs get 503
    problem+json "unavailable" with Retry-After and /readyz is 503; once Kafka is reachable
    exactly the 202'd reports reach the topic, none of the 503'd ones."""
    kafka = topics(broker.bootstrap)
    spool_dir = tmp_path / "spool"
    unreachable = replace(kafka, bootstrap_servers=f"127.0.0.1:{free_port()}")
    client = await start_ingress(settings_for(unreachable, spool_dir, spool_max_bytes=48_000))
    tracked_clients.append(client)
    calls = [str(uuid.uuid4())]
    sent = await post_series(client, WEBHOOK_PATH, "fill", 40, calls)
    accepted = [s for s in sent if s.status == 202]
    refused = [s for s in sent if s.status != 202]
    assert accepted
    assert refused
    assert all(s.durable == "spool" for s in accepted)
    assert {(s.status, s.retry_after) for s in refused} == {(503, "30")}
    # Once full, nothing after it is accepted: the spool never skips ahead.
    assert sent[: len(accepted)] == accepted
    body = report(calls[0])
    resp = await client.post(WEBHOOK_PATH, data=body, headers=signed(body, TEST_SECRET))
    assert resp.status == 503
    assert resp.content_type == "application/problem+json"
    problem = await resp.json()
    assert problem["type"] == "urn:callstream:problem:unavailable"
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert (await ready.json())["durable"] is None
    await client.close()

    client = await start_ingress(settings_for(kafka, spool_dir))
    tracked_clients.append(client)
    await wait_drained(client)
    got = await landed(kafka)
    assert_all_acknowledged_landed(sent, got)
    assert set(got.request_ids) == {s.request_id for s in accepted}


# -- the ingress as a real process, crashing at each crash point -------------------------


@dataclass
class IngressProcess:
    process: ChildProcess
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def spawn_ingress(
    bootstrap: str,
    kafka: KafkaSettings,
    spool_dir: Path,
    log: Path,
    crash_at: str | None,
    *,
    workers: int = 1,
) -> IngressProcess:
    """`callstream ingress`; with one worker (the default here) it is a single process, whose
    pid the crash tests kill and whose spool is `spool_dir` itself."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLSTREAM_")} | {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "CALLSTREAM_TOPIC": kafka.topic,
        "CALLSTREAM_EVENTS_TOPIC": kafka.events_topic,
        "CALLSTREAM_INGRESS_HOST": "127.0.0.1",
        "CALLSTREAM_INGRESS_PORT": str(port),
        "CALLSTREAM_WEBHOOK_SECRET": TEST_SECRET,
        "CALLSTREAM_SPOOL_DIR": str(spool_dir),
        "CALLSTREAM_KAFKA_ACK_DEADLINE_SECONDS": str(ACK_DEADLINE),
        "CALLSTREAM_INGRESS_WORKERS": str(workers),
    }
    if crash_at is not None:
        env["CALLSTREAM_TEST_CRASH_AT"] = crash_at
    process = ChildProcess(callstream_argv("ingress"), env=env, log_file=log, cwd=REPO)
    return IngressProcess(process.start(), port, log)


async def wait_ready(http: aiohttp.ClientSession, ingress: IngressProcess) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        assert ingress.process.poll() is None, ingress.log.read_text()[-3000:]
        try:
            async with http.get(f"{ingress.url}/readyz") as resp:
                if resp.status == 200:
                    state: dict[str, Any] = await resp.json()
                    return state
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, ingress.log.read_text()[-3000:]
        await asyncio.sleep(0.1)


async def stop_ingress(ingress: IngressProcess, *, expect: int | None = 0) -> int:
    if expect == 0:
        ingress.process.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.to_thread(ingress.process.wait, 30)
    finally:
        if ingress.process.running():
            await asyncio.to_thread(ingress.process.kill)
    if expect is not None:
        assert code == expect, ingress.log.read_text()[-3000:]
    return code


async def drained_state(http: aiohttp.ClientSession, ingress: IngressProcess) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        async with http.get(f"{ingress.url}/readyz") as resp:
            state: dict[str, Any] = await resp.json()
        if state["spool"]["records"] == 0 and state["durable"] == "kafka":
            return state
        assert time.monotonic() < deadline, state
        await asyncio.sleep(0.2)


async def run_until_drained(
    http: aiohttp.ClientSession, bootstrap: str, kafka: KafkaSettings, spool_dir: Path, log: Path
) -> None:
    """A fresh ingress process on `spool_dir`, until it has sent its spool to Kafka."""
    ingress = spawn_ingress(bootstrap, kafka, spool_dir, log, None)
    try:
        await wait_ready(http, ingress)
        await drained_state(http, ingress)
    finally:
        await stop_ingress(ingress)


@pytest.mark.parametrize(
    "crash_at", ["spool-after-write-before-fsync", "spool-after-fsync-before-response"]
)
async def test_ingress_crash_while_spooling_loses_no_acknowledged_report(
    broker: LocalKafka, tmp_path: Path, crash_at: str
) -> None:
    """Oracle: a real ingress process spools reports (Kafka unreachable), is stopped, then a
    second run exits (99) at `crash_at` while spooling more; a third run with Kafka back
    publishes every report that ever got a 2xx. Unanswered ones may or may not land."""
    kafka = topics(broker.bootstrap)
    spool_dir, log = tmp_path / "spool", tmp_path / "ingress.log"
    unreachable = f"127.0.0.1:{free_port()}"
    calls = [str(uuid.uuid4()) for _ in range(2)]
    sent: list[Sent] = []
    async with aiohttp.ClientSession() as http:
        first = spawn_ingress(unreachable, kafka, spool_dir, log, None)
        try:
            await wait_ready(http, first)
            sent += await post_series(http, f"{first.url}{WEBHOOK_PATH}", "first", 6, calls)
            assert {(s.status, s.durable) for s in sent} == {(202, "spool")}
        finally:
            await stop_ingress(first)

        crashing = spawn_ingress(unreachable, kafka, spool_dir, log, crash_at)
        try:
            state = await wait_ready(http, crashing)
            assert state["spool"]["records"] == 6
            url = f"{crashing.url}{WEBHOOK_PATH}"
            outcomes = await asyncio.gather(
                *(post(http, url, calls[0], f"crash-{i}") for i in range(5)),
                return_exceptions=True,
            )
            assert all(isinstance(o, aiohttp.ClientError) for o in outcomes), outcomes
        finally:
            await stop_ingress(crashing, expect=CRASH_EXIT_CODE)

        await run_until_drained(http, broker.bootstrap, kafka, spool_dir, log)
    got = await landed(kafka)
    duplicates = assert_all_acknowledged_landed(sent, got)
    unanswered = sum(i.startswith("crash-") for i in set(got.request_ids))
    print(f"{crash_at}: {duplicates} duplicate(s), {unanswered}/5 unanswered report(s) landed")


async def test_ingress_crash_while_draining_duplicates_but_loses_nothing(
    broker: LocalKafka, tmp_path: Path
) -> None:
    """Oracle: a run that exits (99) after Kafka acknowledged a drained batch but before the
    spool forgot it leaves those reports to be published again: every 2xx'd report lands,
    the re-sent batch shows up as duplicates, and the spool ends empty."""
    kafka = topics(broker.bootstrap)
    spool_dir, log = tmp_path / "spool", tmp_path / "ingress.log"
    unreachable = f"127.0.0.1:{free_port()}"
    calls = [str(uuid.uuid4()) for _ in range(3)]
    async with aiohttp.ClientSession() as http:
        first = spawn_ingress(unreachable, kafka, spool_dir, log, None)
        try:
            await wait_ready(http, first)
            sent = await post_series(http, f"{first.url}{WEBHOOK_PATH}", "spooled", 9, calls)
            assert {(s.status, s.durable) for s in sent} == {(202, "spool")}
        finally:
            await stop_ingress(first)

        crashing = spawn_ingress(
            broker.bootstrap, kafka, spool_dir, log, "drain-after-publish-before-delete"
        )
        # Nothing to post: the drainer starts with the app and crashes on its first batch.
        await stop_ingress(crashing, expect=CRASH_EXIT_CODE)

        await run_until_drained(http, broker.bootstrap, kafka, spool_dir, log)
    duplicates = assert_all_acknowledged_landed(sent, await landed(kafka))
    assert duplicates == 9, "the crashed run's batch should have been published twice"
    assert not list(spool_dir.glob("*.unreadable"))


async def test_ingress_stops_promptly_and_loses_nothing_when_the_broker_is_gone(
    broker: LocalKafka, tmp_path: Path
) -> None:
    """SIGTERM with Kafka gone and a report still unacknowledged by it: the ingress exits 0
    (aiokafka alone would retry that batch for ever), and the next run, with Kafka back,
    publishes every report that got a 202."""
    kafka = topics(broker.bootstrap)
    spool_dir, log = tmp_path / "spool", tmp_path / "ingress.log"
    calls = [str(uuid.uuid4()) for _ in range(2)]
    async with aiohttp.ClientSession() as http:
        first = spawn_ingress(broker.bootstrap, kafka, spool_dir, log, None)
        try:
            await wait_ready(http, first)
            sent = await post_series(http, f"{first.url}{WEBHOOK_PATH}", "before", 2, calls)
            assert {(s.status, s.durable) for s in sent} == {(202, "kafka")}
            broker.kill(signal.SIGKILL)
            try:
                during = await post_series(http, f"{first.url}{WEBHOOK_PATH}", "during", 2, calls)
                assert {(s.status, s.durable) for s in during} == {(202, "spool")}
                sent += during
                # Bounded: the drainer's grace, then the producer's flush grace.
                await stop_ingress(first)
            finally:
                await asyncio.to_thread(broker.start, 120)
        finally:
            await stop_ingress(first, expect=None)
        text = log.read_text()
        assert "Traceback" not in text, text[-3000:]
        assert "took no acknowledgements" in text

        await run_until_drained(http, broker.bootstrap, kafka, spool_dir, log)
    assert_all_acknowledged_landed(sent, await landed(kafka))


async def post_under_load(
    client: Client,
    calls: list[str],
    stop: asyncio.Event,
    senders: int = 8,
    *,
    fresh_calls: bool = False,
) -> list[Sent]:
    """`senders` concurrent posters, each round-robin over `calls` (or each report a call
    of its own) one request at a time, until `stop` is set; every outcome is kept (in
    acknowledgement order per sender)."""
    sent: list[Sent] = []

    async def sender(n: int) -> None:
        i = 0
        while not stop.is_set():
            call_id = str(uuid.uuid4()) if fresh_calls else calls[(n + i) % len(calls)]
            sent.append(await post(client, WEBHOOK_PATH, call_id, f"load-{n}-{i:05d}"))
            i += 1
            await asyncio.sleep(0.02)

    await asyncio.gather(*(sender(n) for n in range(senders)))
    return sent


async def test_graceful_broker_restart_under_load_drains_the_spool(
    broker: LocalKafka, tmp_path: Path, tracked_clients: list[Client]
) -> None:
    """Oracle: with reports arriving steadily, a graceful broker stop long enough for queued
    batches to expire, then a start: every report still gets a 2xx, the spool drains
    without restarting the ingress, new reports go straight to Kafka again, and every
    acknowledged report is on the topic in per-call order.

    This once stranded the spool for good: aiokafka fails an expired batch after giving it
    a sequence number it never sent, and the broker then refuses every later batch of that
    producer as out of order."""
    kafka = topics(broker.bootstrap)
    client = await start_ingress(settings_for(kafka, tmp_path / "spool"))
    tracked_clients.append(client)
    await wait_durable(client, "kafka")
    calls = [str(uuid.uuid4()) for _ in range(16)]
    stop = asyncio.Event()
    load = asyncio.create_task(post_under_load(client, calls, stop))
    try:
        await asyncio.sleep(3)
        await asyncio.to_thread(broker.stop)
        # Longer than the producer's request timeout (15 s): batches queued for a partition
        # with no leader expire in the client.
        await asyncio.sleep(20)
        await asyncio.to_thread(broker.start, 120)
        await wait_durable(client, "kafka", timeout=60.0)
        await asyncio.sleep(3)  # load keeps flowing onto the recovered broker
    finally:
        stop.set()
        sent = await load
    assert {s.status for s in sent} == {202}
    after = await post_series(client, WEBHOOK_PATH, "after", 5, calls)
    assert {(s.status, s.durable) for s in after} == {(202, "kafka")}
    await wait_drained(client, timeout=60.0)
    duplicates = assert_all_acknowledged_landed(sent + after, await landed(kafka))
    spooled = sum(s.durable == "spool" for s in sent)
    print(f"graceful restart: {len(sent)} sent, {spooled} spooled, {duplicates} duplicate(s)")


@pytest.mark.parametrize("disk_state", ["full", "read-only"])
async def test_ingress_starts_on_a_full_or_read_only_spool_disk(
    broker: LocalKafka, tmp_path: Path, tracked_clients: list[Client], disk_state: str
) -> None:
    """Oracle: reports spooled by one run, then the spool's disk fills up (or turns
    read-only). The next run still starts; with Kafka away too it refuses new reports with
    503 and Retry-After (nothing can keep them) and /readyz says the spool cannot be
    written; with Kafka back the old spool drains and new reports go to Kafka; every 2xx
    is on the topic, no 503 is."""
    kafka = topics(broker.bootstrap)
    unreachable = replace(kafka, bootstrap_servers=f"127.0.0.1:{free_port()}")
    calls = [str(uuid.uuid4()) for _ in range(2)]
    with small_disk(tmp_path / "disk") as disk:
        spool_dir = disk / "spool"
        client = await start_ingress(settings_for(unreachable, spool_dir))
        spooled = await post_series(client, WEBHOOK_PATH, "spooled", 5, calls)
        await client.close()
        assert {(s.status, s.durable) for s in spooled} == {(202, "spool")}
        if disk_state == "full":
            fill(disk)
        else:
            set_read_only(disk, True)
        try:
            client = await start_ingress(settings_for(unreachable, spool_dir))
            tracked_clients.append(client)
            ready = await client.get("/readyz")
            state = await ready.json()
            assert (ready.status, state["durable"]) == (503, None), state
            assert state["spool"]["records"] == 5
            assert state["spool"]["writable"] is False
            refused = await post_series(client, WEBHOOK_PATH, "refused", 2, calls)
            assert all(s.status == 503 and s.retry_after for s in refused), refused
            await client.close()

            client = await start_ingress(settings_for(kafka, spool_dir))
            tracked_clients.append(client)
            await wait_drained(client)
            fresh = await post_series(client, WEBHOOK_PATH, "fresh", 3, calls)
            assert {(s.status, s.durable) for s in fresh} == {(202, "kafka")}
        finally:
            for tracked in tracked_clients:
                await tracked.close()
            tracked_clients.clear()
            if disk_state == "read-only":
                set_read_only(disk, False)
    got = await landed(kafka)
    assert_all_acknowledged_landed(spooled + refused + fresh, got)
    assert set(got.request_ids) == {s.request_id for s in spooled + fresh}
