"""A real `callstream ingress` process under a memory attack: hundreds of senders announce a
~1 MB body, send 990 kB of it and stall, some without credentials and some with credentials
that look right until the body is checked. Afterwards its resident memory must be back near
where it started.

Oracle: RSS (from /proc) after the attack is within MARGIN_MIB of the baseline taken before
it. The figures are printed; `pytest tests/e2e/test_ingress_memory.py -s` shows them
(docs/operations.md quotes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from callstream.ports import free_port
from callstream.processes import ChildProcess, callstream_argv
from core.kafkasettings import KafkaSettings
from core.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, WEBHOOK_PATH
from tests.conftest import TEST_SECRET
from tests.signing import signed
from tests.support.paths import REPO
from tests.support.produce import sample_report

SENDERS = 300  # of each kind, as in the fault run that found the leak
SENT_BYTES = 990_000
ANNOUNCED_BYTES = 999_000  # under the 1 MB body limit, never all sent
# The oracle's slack: the heap's own growth from serving a few thousand requests, not the
# hundreds of MiB of bodies the attack pushes.
MARGIN_MIB = 40.0
SETTLE_SECONDS = 60.0


def rss_mib(pid: int) -> float:
    return _status_kib(pid, "VmRSS:") / 1024


def peak_rss_mib(pid: int) -> float:
    return _status_kib(pid, "VmHWM:") / 1024


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture
def ingress_process(kafka: KafkaSettings, tmp_path: Path) -> Iterator[tuple[ChildProcess, int]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLSTREAM_")} | {
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "CALLSTREAM_TOPIC": kafka.topic,
        "CALLSTREAM_EVENTS_TOPIC": kafka.events_topic,
        "CALLSTREAM_INGRESS_HOST": "127.0.0.1",
        "CALLSTREAM_INGRESS_PORT": str(port),
        "CALLSTREAM_WEBHOOK_SECRET": TEST_SECRET,
        "CALLSTREAM_SPOOL_DIR": str(tmp_path / "spool"),
        "CALLSTREAM_LOG_LEVEL": "WARNING",
        # One process: its memory is what is measured.
        "CALLSTREAM_INGRESS_WORKERS": "1",
    }
    process = ChildProcess(
        callstream_argv("ingress"), env=env, log_file=tmp_path / "ingress.log", cwd=REPO
    ).start()
    try:
        yield process, port
    finally:
        process.stop()


class _Attack:
    def __init__(self, senders: int) -> None:
        self.senders = senders
        self.sent = 0
        self.all_sent = asyncio.Event()
        self.stop = asyncio.Event()

    async def stall(self, port: int, credentials: dict[str, str]) -> None:
        """Announce ANNOUNCED_BYTES, send SENT_BYTES of them, then hold the connection."""
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            head = {"Host": "x", "Content-Type": "application/json"} | credentials
            head["Content-Length"] = str(ANNOUNCED_BYTES)
            lines = "".join(f"{name}: {value}\r\n" for name, value in head.items())
            writer.write(f"POST {WEBHOOK_PATH} HTTP/1.1\r\n{lines}\r\n".encode())
            writer.write(b'{"message": "' + b"x" * (SENT_BYTES - 13))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            self._one_sent()
            await self.stop.wait()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _one_sent(self) -> None:
        self.sent += 1
        if self.sent == self.senders:
            self.all_sent.set()


async def _serving(http: aiohttp.ClientSession, url: str) -> None:
    data = orjson.dumps(sample_report(f"memory-{time.monotonic_ns()}"))
    async with http.post(f"{url}{WEBHOOK_PATH}", data=data, headers=signed(data, TEST_SECRET)) as r:
        assert r.status == 202, await r.text()


async def _ready(http: aiohttp.ClientSession, url: str, process: ChildProcess) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert process.running(), process.log_tail()
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{url}/readyz") as resp:
                if resp.status == 200 and (await resp.json())["durable"] == "kafka":
                    return
        assert time.monotonic() < deadline, process.log_tail()
        await asyncio.sleep(0.2)


async def test_memory_returns_to_its_baseline_after_a_stalled_body_attack(
    ingress_process: tuple[ChildProcess, int],
) -> None:
    process, port = ingress_process
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        await _ready(http, url, process)
        for _ in range(20):
            await _serving(http, url)
        baseline = rss_mib(process.pid)

        looks_signed = {SIGNATURE_HEADER: "0" * 64, TIMESTAMP_HEADER: str(int(time.time()))}
        kinds = [{}, looks_signed] * SENDERS
        attack = _Attack(len(kinds))
        attackers = [asyncio.create_task(attack.stall(port, kind)) for kind in kinds]
        # Every attacker's bytes out of its hands (taken, or refused and dropped), then a few
        # seconds of samples for the figure.
        await asyncio.wait_for(attack.all_sent.wait(), SETTLE_SECONDS)
        during = 0.0
        for _ in range(10):
            during = max(during, rss_mib(process.pid))
            await asyncio.sleep(0.3)
        attack.stop.set()
        results = await asyncio.gather(*attackers, return_exceptions=True)
        assert not [r for r in results if r is not None], results[:3]
        peak = peak_rss_mib(process.pid)

        deadline = time.monotonic() + SETTLE_SECONDS
        after = rss_mib(process.pid)
        while after > baseline + MARGIN_MIB and time.monotonic() < deadline:
            await asyncio.sleep(1)
            after = rss_mib(process.pid)
        await _serving(http, url)
    print(
        f"\ningress RSS MiB: baseline {baseline:.0f}, during the attack {during:.0f} "
        f"(peak {peak:.0f}), after {after:.0f}"
    )
    assert after <= baseline + MARGIN_MIB, (baseline, during, peak, after)
