"""`callstream run` as a user runs it, as fixtures: the pipeline's processes on free ports,
an SMTP server and a webhook receiver for its alerts."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiosmtpd.controller import Controller

from callstream.ports import free_port, free_ports
from callstream.processes import ChildProcess, callstream_argv
from core.kafkasettings import KafkaSettings
from core.settings import to_env
from tests.support.samples import SAMPLE

SECRET = "e2e-webhook-secret-5f1c"


class _Mailbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        from email import message_from_bytes

        self.messages.append(message_from_bytes(envelope.content))  # type: ignore[attr-defined]
        return "250 OK"


@dataclass
class Receivers:
    hooks: list[dict[str, object]]
    mailbox: _Mailbox
    hook_url: str
    smtp_port: int


@pytest.fixture
async def receivers() -> AsyncIterator[Receivers]:
    hooks: list[dict[str, object]] = []

    async def hook(request: web.Request) -> web.Response:
        hooks.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    mailbox = _Mailbox()
    smtp = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        yield Receivers(
            hooks, mailbox, f"http://127.0.0.1:{runner.addresses[0][1]}/hook", smtp.port
        )
    finally:
        smtp.stop()
        await runner.cleanup()


@dataclass
class Pipeline:
    process: ChildProcess
    env: dict[str, str]
    ingress_port: int
    metrics_port: int
    db: Path
    log: Path


@pytest.fixture
def pipeline(tmp_path: Path, kafka: KafkaSettings, receivers: Receivers) -> Iterator[Pipeline]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        f"""
channels:
  hook:
    type: webhook
    url: {receivers.hook_url}
    secret_env: E2E_HOOK_SECRET
  mail:
    type: email
    host: 127.0.0.1
    port: {receivers.smtp_port}
    starttls: false
    from: alerts@callstream.test
    to: [team@callstream.test]
rules:
  - name: happy-caller
    when: sentiment >= 9 and vervolgactie_nodig
    channels: [hook, mail]
"""
    )
    ports = dict(zip(("ingress", "storage", "alerting", "metrics"), free_ports(4), strict=True))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CALLSTREAM_")},
        **to_env(kafka),
        "CALLSTREAM_WEBHOOK_SECRET": SECRET,
        "CALLSTREAM_INGRESS_PORT": str(ports["ingress"]),
        "CALLSTREAM_INGRESS_HOST": "127.0.0.1",
        "CALLSTREAM_METRICS_HOST": "127.0.0.1",
        "CALLSTREAM_STORAGE_PORT": str(ports["storage"]),
        "CALLSTREAM_ALERTING_PORT": str(ports["alerting"]),
        "CALLSTREAM_METRICS_PORT": str(ports["metrics"]),
        "CALLSTREAM_SQLITE_PATH": str(tmp_path / "calls.db"),
        "CALLSTREAM_ALERT_STATE_PATH": str(tmp_path / "alerting.db"),
        "CALLSTREAM_METRICS_STATE_PATH": str(tmp_path / "metrics.db"),
        "CALLSTREAM_SPOOL_DIR": str(tmp_path / "spool"),
        "CALLSTREAM_ALERT_RULES": str(rules),
        "CALLSTREAM_ALERT_ALLOWED_NETWORKS": "127.0.0.1/32",
        "E2E_HOOK_SECRET": "hook-secret-e2e",
        "CALLSTREAM_HOME": str(tmp_path / "home"),
    }
    log = tmp_path / "pipeline.log"
    process = ChildProcess(callstream_argv("run"), env=env, log_file=log, cwd=tmp_path).start()
    try:
        yield Pipeline(process, env, ports["ingress"], ports["metrics"], tmp_path / "calls.db", log)
    finally:
        process.stop(grace=40)


async def until(check: object, timeout: float = 60.0, what: str = "") -> None:
    assert callable(check)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            if await check():
                return
        except (aiohttp.ClientError, sqlite3.Error, OSError):
            pass
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.25)


async def ingress_ready(pipeline: Pipeline, timeout: float = 240.0) -> None:
    """Until the pipeline's ingress answers /readyz with 200 (it starts after the broker)."""
    url = f"http://127.0.0.1:{pipeline.ingress_port}/readyz"
    async with aiohttp.ClientSession() as session:

        async def ready() -> bool:
            async with session.get(url) as resp:
                return resp.status == 200

        await until(ready, timeout=timeout, what="ingress ready")


def rows(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("select call_id, from_number from call_reports").fetchall()


async def metric(session: aiohttp.ClientSession, port: int, line_prefix: str) -> float | None:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(line_prefix):
                return float(line.rsplit(" ", 1)[1])
    return None


def send_sample(pipeline: Pipeline) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callstream", "send", str(SAMPLE)],
        env=pipeline.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
