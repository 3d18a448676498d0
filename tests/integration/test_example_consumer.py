"""The documented example consumer, attached the documented way: its own package
(examples/crm-forward), installed into this venv, found through the `callstream.consumers`
entry point and run by the real command against the real broker.

Copy this file as the template for testing a consumer of your own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from callstream.supervisor import services
from core.kafkasettings import KafkaSettings
from core.settings import to_env
from tests.support.cli import one_line_error, run_cli
from tests.support.paths import REPO
from tests.support.produce import produce_reports, sample_report

EXAMPLE = REPO / "examples" / "crm-forward"
DISTRIBUTION = "callstream-crm-forward"


def _pip(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def crm_forward_installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """pip-installs the example as a user would, from a copy (a build writes into its source
    tree), and uninstalls it afterwards, so the other tests see only the built-in consumers."""
    source = tmp_path_factory.mktemp("crm-forward") / "crm-forward"
    shutil.copytree(EXAMPLE, source)
    _pip("uninstall", "-y", DISTRIBUTION)  # a run that died half-way left it installed
    _pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(source))
    try:
        yield
    finally:
        _pip("uninstall", "-y", DISTRIBUTION)


def _env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSTREAM_", "KAFKA_"))}
    return base | {"CALLSTREAM_LOG_LEVEL": "WARNING"} | extra


@pytest.mark.usefixtures("crm_forward_installed")
async def test_installed_consumer_is_listed_with_its_package_and_version(
    kafka: KafkaSettings,
) -> None:
    done = await asyncio.to_thread(run_cli, "consumers", "--json", env=_env(**to_env(kafka)))
    assert done.returncode == 0, done.stderr
    listed = {entry["name"]: entry for entry in map(orjson.loads, done.stdout.splitlines())}
    assert listed["crm-forward"]["origin"] == f"{DISTRIBUTION} 0.1.0"
    assert listed["crm-forward"]["group_id"] == "callstream-crm-forward"
    assert listed["crm-forward"]["description"] == "summaries to the CRM"
    assert listed["storage"]["origin"] == "built-in"


@pytest.mark.usefixtures("crm_forward_installed")
def test_callstream_run_starts_the_installed_consumer_with_the_built_in_ones() -> None:
    assert services(with_consumers=True) == [
        ("ingress", ["ingress"]),
        *[(name, ["consumer", name]) for name in ("storage", "alerting", "metrics")],
        ("crm-forward", ["consumer", "crm-forward"]),
    ]


@pytest.mark.usefixtures("crm_forward_installed")
async def test_installed_consumer_runs_and_forwards_every_report_once(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    received: list[dict[str, object]] = []
    failures_left = 1

    async def crm(request: web.Request) -> web.Response:
        nonlocal failures_left
        if failures_left:
            failures_left -= 1
            return web.Response(status=503)  # a CRM hiccup: the runner must retry
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_put("/calls", crm)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    ids = await produce_reports(kafka, [sample_report() for _ in range(3)])
    env = _env(
        **to_env(kafka),
        CALLSTREAM_CRM_URL=f"http://127.0.0.1:{port}/calls",
        CALLSTREAM_CRM_FORWARD_PORT="0",
        CALLSTREAM_GROUP_ID=f"callstream-crm-forward-{uuid.uuid4().hex[:8]}",
        CALLSTREAM_RETRY_INITIAL_SECONDS="0.05",
    )
    log = (tmp_path / "consumer.log").open("wb")
    service = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "callstream", "consumer", "crm-forward",
        env=env, cwd=REPO, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while len(received) < 3:
            assert service.returncode is None, (tmp_path / "consumer.log").read_text()
            assert asyncio.get_running_loop().time() < deadline, received
            await asyncio.sleep(0.05)
        service.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(service.wait(), 60) == 0
    finally:
        if service.returncode is None:
            service.kill()
            await service.wait()
        log.close()
        await runner.cleanup()
    assert sorted(str(r["externalId"]) for r in received) == sorted(ids)
    assert {r["candidateId"] for r in received} == {"cand_123456"}


def _fake_distribution(site: Path, name: str, entry_points: str) -> None:
    """A distribution as an installer leaves it: metadata and entry points, nothing more
    (the clash is found before anything is imported)."""
    info = site / f"{name.replace('-', '_')}-9.9.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 9.9\n")
    (info / "entry_points.txt").write_text(f"[callstream.consumers]\n{entry_points}\n")


def test_a_package_consumer_named_like_a_built_in_is_a_one_line_error(tmp_path: Path) -> None:
    _fake_distribution(tmp_path, "storage-lookalike", "storage = storage_lookalike:SPEC")
    line = one_line_error(run_cli("consumer", "storage", env=_env(PYTHONPATH=str(tmp_path))))
    assert "'storage'" in line
    assert "storage-lookalike 9.9" in line
    assert "built-in" in line


def test_two_packages_with_one_consumer_name_is_a_one_line_error(tmp_path: Path) -> None:
    _fake_distribution(tmp_path, "first-pkg", "crm = first_pkg:SPEC")
    _fake_distribution(tmp_path, "second-pkg", "crm = second_pkg:SPEC")
    line = one_line_error(run_cli("consumers", env=_env(PYTHONPATH=str(tmp_path))))
    assert "first-pkg 9.9" in line
    assert "second-pkg 9.9" in line


def test_an_entry_point_that_is_not_a_consumer_spec_is_a_one_line_error(tmp_path: Path) -> None:
    _fake_distribution(tmp_path, "not-a-spec", "odd = not_a_spec:SPEC")
    (tmp_path / "not_a_spec.py").write_text("SPEC = 42\n")
    line = one_line_error(run_cli("consumer", "odd", env=_env(PYTHONPATH=str(tmp_path))))
    assert "'odd' of not-a-spec 9.9" in line
    assert "is of type int, not a consumers.contract.ConsumerSpec" in line


def test_a_consumer_name_that_cannot_name_a_variable_is_a_one_line_error(tmp_path: Path) -> None:
    _fake_distribution(tmp_path, "dotted", "crm.forward = dotted:SPEC")
    line = one_line_error(run_cli("consumers", env=_env(PYTHONPATH=str(tmp_path))))
    assert "'crm.forward' of dotted 9.9 is not lower-case letters" in line
