"""A real Prometheus (Debian's) scrapes a running `callstream run`, and every query of every
dashboard panel returns data. Oracle: no panel of the provisioned dashboard is empty once one
report has gone through the pipeline."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from callstream.ports import free_port
from callstream.processes import ChildProcess
from tests.support.paths import REPO
from tests.support.pipeline import Pipeline, Receivers, send_sample, until

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "callstream.json"
SCRAPE_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"].replace("$__rate_interval", "1m"))
        for panel in board["panels"]
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


@pytest.fixture
def prometheus(tmp_path: Path, pipeline: Pipeline) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: run scripts/install-system-deps"
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config.pop("rule_files", None)
    ports = {
        "ingress": pipeline.env["CALLSTREAM_INGRESS_PORT"],
        "storage": pipeline.env["CALLSTREAM_STORAGE_PORT"],
        "alerting": pipeline.env["CALLSTREAM_ALERTING_PORT"],
        "metrics": pipeline.env["CALLSTREAM_METRICS_PORT"],
    }
    port = free_port()
    ports["prometheus"] = str(port)
    for job in config["scrape_configs"]:
        # The repo's own config, with the ports this test's pipeline got.
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    argv = [
        binary,
        f"--config.file={path}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    process = ChildProcess(argv, log_file=tmp_path / "prometheus.log").start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop(grace=30)


async def test_every_dashboard_query_returns_data(
    pipeline: Pipeline, receivers: Receivers, prometheus: str, tmp_path: Path
) -> None:
    async with aiohttp.ClientSession() as session:

        async def ready() -> bool:
            url = f"http://127.0.0.1:{pipeline.ingress_port}/readyz"
            async with session.get(url) as resp:
                return resp.status == 200

        await until(ready, what="ingress ready")
        sent = await asyncio.to_thread(send_sample, pipeline)
        assert sent.returncode == 0, sent.stderr
        # And one the ingress refuses (no call id): the quarantine panel counts it.
        unkeyed = tmp_path / "no-call-id.json"
        unkeyed.write_bytes(b'{"message": {"type": "end-of-call-report", "summary": "probe"}}')
        refused = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "callstream", "send", str(unkeyed)],
            env=pipeline.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert refused.stdout.startswith("422 "), refused.stdout + refused.stderr

        async def alerted() -> bool:
            return len(receivers.hooks) == 1

        await until(alerted, what="the alert")

        async def query(expr: str) -> list[object]:
            async with session.get(f"{prometheus}/api/v1/query", params={"query": expr}) as resp:
                body = await resp.json()
                assert body["status"] == "success", (expr, body)
                return list(body["data"]["result"])

        async def all_targets_up() -> bool:
            return len(await query("up == 1")) == 5

        await until(all_targets_up, what="every scrape target up")
        empty: list[str] = []

        async def every_panel_has_data() -> bool:
            # Rates need two scrapes after the report.
            nonlocal empty
            empty = [
                f"{title}: {expr}" for title, expr in dashboard_queries() if not await query(expr)
            ]
            return not empty

        try:
            await until(every_panel_has_data, what="data in every panel")
        except AssertionError:
            raise AssertionError("panels without data:\n" + "\n".join(empty)) from None

        async def quarantined() -> bool:
            kept = await query('callstream_ingress_quarantined_total{reason="invalid-report"} == 1')
            return len(kept) == 1

        await until(quarantined, what="the refused report counted as quarantined")
