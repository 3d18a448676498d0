"""CALLSTREAM_INGRESS_WORKERS=2: a replayed signed request is one delivery for the whole
ingress, whichever worker each copy lands on. On the session broker (nothing here breaks it)."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import aiohttp
import pytest

from core.signing import WEBHOOK_PATH
from ingress.spoolformat import read_pending
from tests.conftest import TEST_SECRET
from tests.e2e.test_ingress_faults import (
    landed,
    metric,
    report,
    spawn_ingress,
    stop_ingress,
    topics,
    wait_ready,
)
from tests.e2e.test_ingress_workers import until, workers_of
from tests.signing import signed

pytestmark = pytest.mark.slow

COPIES = 40
LISTEN = "0A"  # the TCP state in /proc/net/tcp


def listening(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on `port`: a worker exists a while
    before it binds, and until then every connection goes to the other one."""
    sockets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            sockets.add(target[len("socket:[") : -1])
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rpartition(":")[2], 16)
        if local_port == port and fields[3] == LISTEN and fields[9] in sockets:
            return True
    return False


async def test_a_signed_request_replayed_to_two_workers_is_published_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Oracle: one signed request sent 40 times at once, each on a fresh connection (so the
    kernel spreads the copies over both workers), gets 40 answers 202 with one and the same
    body, /metrics (either worker's: it sums both) counts 39 of them replayed, and exactly
    one record is on the topic."""
    kafka = topics(kafka_bootstrap)
    spool, log = tmp_path / "spool", tmp_path / "ingress.log"
    ingress = spawn_ingress(kafka_bootstrap, kafka, spool, log, None, workers=2)
    connector = aiohttp.TCPConnector(force_close=True, limit=COPIES)
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            await wait_ready(http, ingress)
            await until("two workers", lambda: len(workers_of(ingress.process.pid)) == 2)
            await until(
                "both workers listening",
                lambda: all(
                    listening(pid, ingress.port) for pid in workers_of(ingress.process.pid).values()
                ),
            )
            body = report(str(uuid.uuid4()), "replayed")
            headers = signed(body, TEST_SECRET) | {"X-Request-Id": str(uuid.uuid4())}
            url = f"{ingress.url}{WEBHOOK_PATH}"

            async def send() -> tuple[int, bytes]:
                async with http.post(url, data=body, headers=headers) as resp:
                    return resp.status, await resp.read()

            answers = await asyncio.gather(*(send() for _ in range(COPIES)))
            assert {status for status, _ in answers} == {202}, answers[:3]
            assert len({answer for _, answer in answers}) == 1, answers[:3]
            async with http.get(f"{ingress.url}/metrics") as resp:
                text = await resp.text()
            assert metric(text, 'callstream_ingress_requests_total{outcome="replayed"}') == (
                COPIES - 1
            )
            # A just-created topic may still be electing leaders: then the first was spooled.
            dirs = [spool / "worker-0", spool / "worker-1"]
            await until("the spools drained", lambda: not any(map(read_pending, dirs)))
        got = await landed(kafka)
        assert len(got.request_ids) == 1, got.request_ids
        assert await stop_ingress(ingress) == 0
    finally:
        if ingress.process.running():
            # Stopped as it would be in production, so a failure above is the one reported.
            ingress.process.send_signal(signal.SIGTERM)
            await stop_ingress(ingress, expect=None)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
