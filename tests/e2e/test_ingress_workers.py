"""CALLSTREAM_INGRESS_WORKERS=2: two ingress processes on one port, each spooling to its own
directory, one /metrics for both, and nothing acknowledged lost when one of them is killed
while Kafka is away. On a broker of the test's own (it is killed)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from callstream.localkafka import LocalKafka
from core.signing import WEBHOOK_PATH
from ingress.spoolformat import read_pending
from tests.e2e.test_ingress_faults import (
    IngressProcess,
    Sent,
    landed,
    metric,
    post_series,
    spawn_ingress,
    stop_ingress,
    topics,
    wait_ready,
)
from tests.support.kafka import private_broker

pytestmark = pytest.mark.slow

SPOOLED = 40
RECORDS = "callstream_ingress_spool_records"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    with private_broker(tmp_path_factory.mktemp("workers-kafka") / "home") as local:
        yield local


def workers_of(parent: int) -> dict[int, int]:
    """Worker index -> pid, for the running children of `parent`."""
    found = {}
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    for pid in map(int, children):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"--worker" in argv:
            found[int(argv[argv.index(b"--worker") + 1])] = pid
    return found


async def until(what: str, check: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.2)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def scrape(http: aiohttp.ClientSession, ingress: IngressProcess) -> str:
    async with http.get(f"{ingress.url}/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


async def test_two_workers_share_the_port_and_the_metrics_and_lose_nothing_when_one_dies(
    broker: LocalKafka, tmp_path: Path
) -> None:
    """Oracle: with Kafka killed, reports posted on fresh connections are spooled by both
    workers (records in worker-0 and worker-1), and /metrics, whichever worker answers,
    counts every request and every spooled record. Worker 1 is SIGKILLed, the parent starts
    it again, Kafka comes back: every acknowledged report is on the topic and both spool
    directories are empty. SIGTERM to the parent stops it and every worker, exit 0."""
    kafka = topics(broker.bootstrap)
    spool, log = tmp_path / "spool", tmp_path / "ingress.log"
    ingress = spawn_ingress(broker.bootstrap, kafka, spool, log, None, workers=2)
    dirs = [spool / "worker-0", spool / "worker-1"]
    # A connection per request: the kernel spreads connections, not requests, over workers.
    connector = aiohttp.TCPConnector(force_close=True)
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            await wait_ready(http, ingress)
            await until("two workers", lambda: len(workers_of(ingress.process.pid)) == 2)
            url = f"{ingress.url}{WEBHOOK_PATH}"
            calls = [str(uuid.uuid4()) for _ in range(5)]
            sent: list[Sent] = await post_series(http, url, "up", 10, calls)
            assert {s.status for s in sent} == {202}
            # A just-created topic may still be electing leaders: then even these were spooled.
            await until("the first reports drained", lambda: not any(map(read_pending, dirs)))

            broker.kill(signal.SIGKILL)
            try:
                down = await post_series(http, url, "down", SPOOLED, calls)
                assert {(s.status, s.durable) for s in down} == {(202, "spool")}
                sent += down
                held = [len(read_pending(d)) for d in dirs]
                assert sum(held) == SPOOLED
                assert min(held) > 0, f"one worker got every request: {held}"
                # Each worker writes its gauges every second: wait for the last one's.
                deadline = time.monotonic() + 30
                while metric(await scrape(http, ingress), RECORDS) != SPOOLED:
                    assert time.monotonic() < deadline, await scrape(http, ingress)
                    await asyncio.sleep(0.5)
                # Any worker's answer counts both workers' requests and spools.
                for _ in range(8):
                    text = await scrape(http, ingress)
                    accepted = 'callstream_ingress_requests_total{outcome="accepted"}'
                    assert metric(text, accepted) == len(sent)
                    assert metric(text, RECORDS) == SPOOLED

                victim = workers_of(ingress.process.pid)[1]
                os.kill(victim, signal.SIGKILL)
                await until(
                    "worker 1 started again",
                    lambda: workers_of(ingress.process.pid).get(1, victim) != victim,
                )
            finally:
                await asyncio.to_thread(broker.start, 120)

            await until("both spools drained", lambda: not any(read_pending(d) for d in dirs), 180)
            # Each worker writes its gauges every second; whichever answers reports both.
            deadline = time.monotonic() + 30
            while metric(await scrape(http, ingress), RECORDS):
                assert time.monotonic() < deadline, "the spool gauge never came back to 0"
                await asyncio.sleep(0.5)
        got = await landed(kafka)
        missing = {s.request_id for s in sent} - set(got.request_ids)
        assert not missing, f"acknowledged but not on the topic: {sorted(missing)}"

        children = list(workers_of(ingress.process.pid).values())
        assert await stop_ingress(ingress) == 0
        assert not [pid for pid in children if alive(pid)]
    finally:
        await stop_ingress(ingress, expect=None)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
