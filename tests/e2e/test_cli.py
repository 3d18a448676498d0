"""The `callstream` command as a user types it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import orjson

from callstream.ports import free_port
from core.kafkasettings import KafkaSettings
from core.signing import WEBHOOK_PATH
from schemas.store import END_OF_CALL_REPORT, default_store
from tests.signing import signed
from tests.support.cli import run_cli
from tests.support.paths import REPO
from tests.support.produce import produce_reports, sample_report
from tests.support.topics import read_back


def _env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSTREAM_", "KAFKA_"))}
    return base | extra


async def test_tail_prints_decoded_reports_as_json_lines(kafka: KafkaSettings) -> None:
    [call_id] = await produce_reports(kafka, [sample_report()])
    env = _env(KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap_servers, CALLSTREAM_TOPIC=kafka.topic)
    done = await asyncio.to_thread(run_cli, "tail", "--follow", "--max", "1", env=env)
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    record = json.loads(line)
    assert record["key"] == call_id
    assert record["schema"] == "end_of_call_report"
    assert record["record"]["call_id"] == call_id
    assert record["record"]["structured_data"]["sentiment"] == 9
    assert record["writer_version"] == default_store().current(END_OF_CALL_REPORT).version


async def test_kafka_start_status_stop(tmp_path: Path) -> None:
    env = _env(CALLSTREAM_HOME=str(tmp_path / "home"))
    status = await asyncio.to_thread(run_cli, "kafka", "status", env=env)
    assert status.returncode == 1
    assert "not running" in status.stdout
    started = await asyncio.to_thread(run_cli, "kafka", "start", env=env)
    try:
        assert started.returncode == 0, started.stderr
        bootstrap = started.stdout.strip().splitlines()[-1]
        assert bootstrap.startswith("127.0.0.1:")
        status = await asyncio.to_thread(run_cli, "kafka", "status", env=env)
        assert status.returncode == 0
        assert f"bootstrap={bootstrap}" in status.stdout
    finally:
        stopped = await asyncio.to_thread(run_cli, "kafka", "stop", env=env)
    assert stopped.returncode == 0
    assert (await asyncio.to_thread(run_cli, "kafka", "status", env=env)).returncode == 1


async def test_consumer_with_bad_configuration_exits_2_with_a_message(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: x\n    when: sentiment <\n    channels: [nowhere]\n")
    env = _env(
        KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap_servers,
        CALLSTREAM_ALERT_RULES=str(rules),
        CALLSTREAM_ALERTING_PORT="0",
    )
    done = await asyncio.to_thread(run_cli, "consumer", "alerting", env=env)
    assert done.returncode == 2
    assert "configuration error" in done.stderr
    assert "Traceback" not in done.stderr


async def test_ingress_sigterm_finishes_in_flight_requests_and_flushes(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    """Oracle: every request that got a 202 before shutdown is on the topic; exit code 0."""
    port = free_port()
    secret = "shutdown-secret"
    env = _env(
        KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap_servers,
        CALLSTREAM_TOPIC=kafka.topic,
        CALLSTREAM_EVENTS_TOPIC=kafka.events_topic,
        CALLSTREAM_INGRESS_PORT=str(port),
        CALLSTREAM_INGRESS_HOST="127.0.0.1",
        CALLSTREAM_WEBHOOK_SECRET=secret,
        CALLSTREAM_SPOOL_DIR=str(tmp_path / "spool"),
        CALLSTREAM_INGRESS_WORKERS="1",
    )
    log = (tmp_path / "ingress.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "callstream", "ingress", env=env, stdout=log, stderr=log
    )
    accepted: list[str] = []
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}"
            deadline = asyncio.get_running_loop().time() + 60
            while True:
                # Ready on Kafka, not just on the spool: the oracle reads the topic.
                try:
                    async with session.get(f"{url}/readyz") as resp:
                        if resp.status == 200 and (await resp.json())["durable"] == "kafka":
                            break
                except aiohttp.ClientError:
                    pass
                assert asyncio.get_running_loop().time() < deadline, "ingress never ready"
                await asyncio.sleep(0.2)

            async def post(call_id: str) -> None:
                body = orjson.dumps(sample_report(call_id))
                try:
                    async with session.post(
                        f"{url}{WEBHOOK_PATH}", data=body, headers=signed(body, secret)
                    ) as resp:
                        if resp.status == 202:
                            accepted.append(call_id)
                            first_accepted.set()
                except aiohttp.ClientError:
                    pass  # refused after shutdown began: never acknowledged, never claimed

            first_accepted = asyncio.Event()
            posts = [asyncio.create_task(post(str(uuid.uuid4()))) for _ in range(40)]
            # Shut down with requests in flight: after the first answer, before the last.
            await asyncio.wait_for(first_accepted.wait(), 30)
            process.send_signal(signal.SIGTERM)
            await asyncio.gather(*posts)
        code = await asyncio.wait_for(process.wait(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        log.close()
    assert code == 0
    assert accepted, "no request was in flight when shutdown began"
    landed = await read_back(kafka, kafka.topic, expect=len(accepted))
    assert {item.raw.key.decode() for item in landed if item.raw.key} >= set(accepted)


def test_settings_env_example_prints_the_checked_in_file() -> None:
    # Whatever the caller's environment holds, the example shows the declared defaults.
    env = _env(CALLSTREAM_INGRESS_PORT="9999", CALLSTREAM_WEBHOOK_SECRET="not-shown")
    done = run_cli("settings", "--env-example", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (REPO / ".env.example").read_text()
    assert "not-shown" not in done.stdout


def test_a_bad_setting_is_a_configuration_error_naming_the_variable() -> None:
    env = _env(KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", CALLSTREAM_MAX_JSON_DEPTH="1")
    done = run_cli("ingress", env=env)
    assert done.returncode == 2
    assert "CALLSTREAM_MAX_JSON_DEPTH=1 is below the minimum 2" in done.stderr


async def test_kafka_cluster_start_env_status_node_stop_start(tmp_path: Path) -> None:
    """The commands a newcomer types for a secured cluster: start three nodes, take the
    environment, look at the status, stop and start one node, stop it all."""
    env = _env(CALLSTREAM_HOME=str(tmp_path / "home"))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("kafka", *args, env=env, timeout=240)

    started = await asyncio.to_thread(cli, "start", "--brokers", "3", "--security", "sasl_ssl")
    try:
        assert started.returncode == 0, started.stderr
        bootstrap = started.stdout.strip().splitlines()[-1]
        assert len(bootstrap.split(",")) == 3
        exported = await asyncio.to_thread(cli, "env")
        assert exported.returncode == 0, exported.stderr
        lines = dict(
            line.removeprefix("export ").split("=", 1) for line in exported.stdout.splitlines()
        )
        assert lines["KAFKA_BOOTSTRAP_SERVERS"] == bootstrap
        assert lines["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        assert lines["KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
        assert await asyncio.to_thread(Path(lines["KAFKA_SSL_CAFILE"]).is_file)
        # What `eval "$(callstream kafka env)"` gives a command: a secured connection.
        client_env = env | {k: v.strip("'") for k, v in lines.items()}
        listed = await asyncio.to_thread(run_cli, "consumers", "--json", env=client_env)
        assert listed.returncode == 0, listed.stderr

        status = await asyncio.to_thread(cli, "status")
        assert status.returncode == 0, status.stderr
        assert "node 1: running" in status.stdout
        assert "brokers in the cluster: [1, 2, 3]" in status.stdout
        assert "active controller: node" in status.stdout

        stopped = await asyncio.to_thread(cli, "stop", "--node", "2")
        assert stopped.returncode == 0, stopped.stderr
        status = await asyncio.to_thread(cli, "status")
        assert "node 2: stopped" in status.stdout
        restarted = await asyncio.to_thread(cli, "start", "--node", "2")
        assert restarted.returncode == 0, restarted.stderr
        assert "node 2: running" in (await asyncio.to_thread(cli, "status")).stdout
    finally:
        done = await asyncio.to_thread(cli, "stop")
    assert done.returncode == 0, done.stderr
    assert "running" not in (await asyncio.to_thread(cli, "status")).stdout.replace(
        "not running", ""
    )
