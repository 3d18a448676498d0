"""Consumer services as real processes under faults: SIGKILL mid-batch, SIGTERM, PostgreSQL down.

Oracle for each: every report on the topic ends up stored exactly once (one row per call id,
all of them present), and no alert is lost or sent twice under a different identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from callstream.bench.services import postgres_count as count_rows
from callstream.consumerstatus import KafkaInspector
from callstream.localkafka import LocalKafka
from callstream.localpg import PostgresServer
from callstream.ports import free_ports
from callstream.processes import ChildProcess, callstream_argv
from core.kafkasettings import KafkaSettings
from tests.support.kafka import private_broker, topics_on
from tests.support.produce import produce_reports, sample_report


class Service(ChildProcess):
    """`callstream consumer NAME` as a child process."""

    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        super().__init__(callstream_argv("consumer", name), env=env, log_file=log, name=name)
        self.log = log

    def signal(self, sig: int) -> int:
        self.send_signal(sig)
        return self.wait(timeout=60)

    def alive(self) -> bool:
        return self.running()


def service_env(kafka: KafkaSettings, **extra: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("CALLSTREAM_")},
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "CALLSTREAM_TOPIC": kafka.topic,
        "CALLSTREAM_GROUP_ID": f"group-{uuid.uuid4().hex[:8]}",
        "CALLSTREAM_METRICS_HOST": "127.0.0.1",
        "CALLSTREAM_STORAGE_PORT": "0",
        "CALLSTREAM_ALERTING_PORT": "0",
        # Small batches so a kill lands in the middle of the stream, not after it.
        "CALLSTREAM_BATCH_SIZE": "50",
        "CALLSTREAM_RETRY_MAX_SECONDS": "1",
        **extra,
    }


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in started:
        service.stop()


async def ids_in(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return {r["call_id"] for r in await conn.fetch("select call_id from call_reports")}
    finally:
        await conn.close()


async def wait_rows(dsn: str, at_least: int, timeout: float = 90.0) -> int:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            rows = await count_rows(dsn)
        except (OSError, asyncpg.PostgresError):
            rows = -1
        if rows >= at_least:
            return rows
        assert asyncio.get_running_loop().time() < deadline, f"only {rows} rows"
        await asyncio.sleep(0.1)


async def test_storage_killed_mid_stream_loses_nothing_and_duplicates_nothing(
    kafka: KafkaSettings, postgres: PostgresServer, tmp_path: Path, services: list[Service]
) -> None:
    dsn = postgres.create_database(f"kill_{uuid.uuid4().hex[:8]}")
    ids = await produce_reports(kafka, [sample_report() for _ in range(3000)])
    env = service_env(kafka, CALLSTREAM_DATABASE_URL=dsn)
    storage = Service("storage", env, tmp_path / "storage.log")
    services.append(storage)
    storage.start()
    await wait_rows(dsn, 300)
    assert storage.signal(signal.SIGKILL) == -signal.SIGKILL
    partial = await count_rows(dsn)
    assert partial < 3000, "the kill came too late to test anything"
    storage.start()
    await wait_rows(dsn, 3000)
    await asyncio.sleep(1.0)
    assert await ids_in(dsn) == set(ids)


async def test_storage_sigterm_finishes_the_batch_and_exits_zero(
    kafka: KafkaSettings, postgres: PostgresServer, tmp_path: Path, services: list[Service]
) -> None:
    dsn = postgres.create_database(f"term_{uuid.uuid4().hex[:8]}")
    ids = await produce_reports(kafka, [sample_report() for _ in range(1000)])
    env = service_env(kafka, CALLSTREAM_DATABASE_URL=dsn)
    storage = Service("storage", env, tmp_path / "storage.log")
    services.append(storage)
    storage.start()
    await wait_rows(dsn, 100)
    assert storage.signal(signal.SIGTERM) == 0
    storage.start()
    await wait_rows(dsn, 1000)
    assert await ids_in(dsn) == set(ids)
    assert "consumer storage stopped cleanly" in (tmp_path / "storage.log").read_text()


async def test_postgres_down_during_consumption_waits_and_loses_nothing(
    kafka: KafkaSettings, postgres: PostgresServer, tmp_path: Path, services: list[Service]
) -> None:
    dsn = postgres.create_database(f"down_{uuid.uuid4().hex[:8]}")
    first = await produce_reports(kafka, [sample_report() for _ in range(200)])
    env = service_env(kafka, CALLSTREAM_DATABASE_URL=dsn)
    storage = Service("storage", env, tmp_path / "storage.log")
    services.append(storage)
    storage.start()
    await wait_rows(dsn, 200)
    postgres.stop()
    try:
        second = await produce_reports(kafka, [sample_report() for _ in range(300)])
        await asyncio.sleep(4.0)
        assert storage.alive(), "the consumer must wait for the database, not die"
    finally:
        postgres.start()
    await wait_rows(dsn, 500)
    assert await ids_in(dsn) == set(first + second)
    assert storage.alive()


async def test_alerting_killed_mid_stream_sends_each_alert_once_per_identity(
    kafka: KafkaSettings, tmp_path: Path, services: list[Service]
) -> None:
    alert_ids: list[str] = []
    calls: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.json()
        alert_ids.append(str(body["alert_id"]))
        calls.append(str(body["call_id"]))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        f"""
channels:
  hook:
    type: webhook
    url: http://127.0.0.1:{port}/hook
    secret_env: FAULT_HOOK_SECRET
    rate: {{per_second: 1000, burst: 1000}}
rules:
  - name: every-call
    when: sentiment >= 0
    channels: [hook]
"""
    )
    ids = await produce_reports(kafka, [sample_report() for _ in range(400)])
    env = service_env(
        kafka,
        CALLSTREAM_ALERT_RULES=str(rules),
        CALLSTREAM_ALERT_STATE_PATH=str(tmp_path / "alerting.db"),
        CALLSTREAM_ALERT_ALLOWED_NETWORKS="127.0.0.1/32",
        FAULT_HOOK_SECRET="fault-secret",
    )
    alerting = Service("alerting", env, tmp_path / "alerting.log")
    services.append(alerting)
    try:
        alerting.start()
        deadline = asyncio.get_running_loop().time() + 90
        while len(calls) < 60:
            assert asyncio.get_running_loop().time() < deadline, len(calls)
            await asyncio.sleep(0.02)
        alerting.signal(signal.SIGKILL)
        assert len(set(calls)) < 400, "the kill came too late to test anything"
        alerting.start()
        while len(set(calls)) < 400:
            assert asyncio.get_running_loop().time() < deadline, len(set(calls))
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)
    finally:
        alerting.stop()
        await runner.cleanup()
    assert set(calls) == set(ids)
    # One alert per call. A kill between a send and its record can repeat that one alert
    # (one per channel at most), with the same alert_id so a receiver can drop it.
    assert len(set(alert_ids)) == 400
    assert len(alert_ids) - len(set(alert_ids)) <= 1


async def test_two_storage_processes_in_one_group_split_the_work_once(
    kafka: KafkaSettings, postgres: PostgresServer, tmp_path: Path, services: list[Service]
) -> None:
    """Scale-out: two processes, one group; every record handled exactly once between them."""
    dsn = postgres.create_database(f"scale_{uuid.uuid4().hex[:8]}")
    group = f"scale-{uuid.uuid4().hex[:8]}"
    ports = free_ports(2)
    for index, port in enumerate(ports):
        env = service_env(kafka, CALLSTREAM_DATABASE_URL=dsn, CALLSTREAM_STORAGE_PORT=str(port)) | {
            "CALLSTREAM_GROUP_ID": group
        }
        service = Service("storage", env, tmp_path / f"storage-{index}.log")
        services.append(service)
        service.start()
    # Both join before the records arrive, so both get partitions.
    deadline = asyncio.get_running_loop().time() + 90
    while not await _group_has(kafka, group, members=2):
        assert asyncio.get_running_loop().time() < deadline, "the two never formed one group"
        await asyncio.sleep(0.2)
    ids = await produce_reports(kafka, [sample_report() for _ in range(1200)])
    await wait_rows(dsn, 1200)
    handled = [await _handled(port) for port in ports]
    assert await ids_in(dsn) == set(ids)
    assert all(count > 0 for count in handled), handled
    assert sum(handled) == 1200


async def _handled(port: int) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        for line in (await resp.text()).splitlines():
            if line.startswith('callstream_consumer_records_handled_total{consumer="storage"}'):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _group_has(kafka: KafkaSettings, group: str, *, members: int) -> bool:
    async with KafkaInspector(kafka) as look:
        state = await look.group(group)
    return state.state == "Stable" and state.members == members


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    with private_broker(tmp_path_factory.mktemp("consumer-fault-kafka") / "home") as local:
        yield local


async def test_a_consumer_stops_cleanly_while_the_broker_is_gone(
    own_broker: LocalKafka, tmp_path: Path, services: list[Service]
) -> None:
    """`callstream kafka stop` before Ctrl-C: the consumer still closes everything it
    opened and exits 0, without a traceback."""
    kafka = topics_on(own_broker, "gone")
    await produce_reports(kafka, [sample_report() for _ in range(5)])
    db = tmp_path / "callstream.db"
    storage = Service(
        "storage", service_env(kafka, CALLSTREAM_SQLITE_PATH=str(db)), tmp_path / "storage.log"
    )
    services.append(storage)
    storage.start()
    await wait_sqlite_rows(db, 5)
    own_broker.kill(signal.SIGKILL)
    try:
        await asyncio.sleep(3.0)  # the consumer's fetches now fail and back off
        assert storage.signal(signal.SIGTERM) == 0
    finally:
        own_broker.start(timeout=120)
    log = storage.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "Unclosed" not in log, log[-3000:]
    assert "consumer storage stopped cleanly" in log


async def wait_sqlite_rows(db: Path, at_least: int, timeout: float = 90.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    rows = 0
    while rows < at_least:
        assert asyncio.get_running_loop().time() < deadline, f"only {rows} rows"
        await asyncio.sleep(0.2)
        with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(db)) as conn:
            rows = int(conn.execute("select count(*) from call_reports").fetchone()[0])
