"""The real `callstream` command when something is wrong: one line on stderr naming the
problem, exit code 2, never a traceback; and the small things a person types first."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from callstream.ports import free_port
from core.kafkasettings import KafkaSettings
from core.settings import to_env
from core.signing import WEBHOOK_PATH
from tests.support.cli import one_line_error, run_cli
from tests.support.paths import DATA, REPO
from tests.support.produce import produce_reports, sample_report

REPORT = DATA / "status-update.json"


def _env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSTREAM_", "KAFKA_"))}
    return base | extra


def test_version_names_the_installed_release() -> None:
    done = run_cli("--version", env=_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "callstream 0.1.0"


def test_a_missing_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-report.json"
    line = one_line_error(run_cli("send", str(missing), env=_env()))
    assert line == f"callstream send: no such file: {missing}"


def test_an_unreachable_url_is_one_line_and_exit_2() -> None:
    url = f"http://127.0.0.1:{free_port()}{WEBHOOK_PATH}"
    line = one_line_error(run_cli("send", str(REPORT), "--url", url, env=_env()))
    assert line.startswith("callstream send: cannot connect: ")
    assert "127.0.0.1" in line


def test_a_bad_setting_value_is_one_line_and_exit_2() -> None:
    done = run_cli("send", str(REPORT), env=_env(CALLSTREAM_INGRESS_PORT="eighty"))
    line = one_line_error(done)
    assert "configuration error" in line
    assert "CALLSTREAM_INGRESS_PORT" in line


@pytest.mark.parametrize(
    "argv", [("erase", "--phone", "+31612345678"), ("purge", "--older-than", "30d")]
)
def test_a_bad_storage_setting_is_a_configuration_error_for_erase_and_purge(
    argv: tuple[str, ...],
) -> None:
    done = run_cli(*argv, env=_env(CALLSTREAM_DATABASE_URL="mysql://u:secret@db/calls"))
    line = one_line_error(done)
    assert line == (
        f"callstream {argv[0]}: configuration error:"
        " CALLSTREAM_DATABASE_URL must be a postgresql:// URL"
    )


def test_a_bad_log_level_is_one_line_and_exit_2() -> None:
    line = one_line_error(
        run_cli("settings", "--env-example", env=_env(CALLSTREAM_LOG_LEVEL="loud"))
    )
    assert "CALLSTREAM_LOG_LEVEL='loud'" in line


def test_an_unknown_consumer_is_one_line_and_exit_2() -> None:
    # No broker is set or running: the name is judged before one is looked for.
    line = one_line_error(run_cli("consumer", "no-such-consumer", env=_env()))
    assert "no consumer named 'no-such-consumer'" in line
    assert "storage" in line


async def test_an_unknown_consumer_in_a_replay_is_exit_2(kafka: KafkaSettings) -> None:
    env = _env(**to_env(kafka))
    done = await asyncio.to_thread(
        run_cli, "replay", "--consumer", "no-such-consumer", "--from", "-1h", env=env
    )
    assert one_line_error(done) == (
        "no consumer named 'no-such-consumer'; registered: alerting, metrics, storage"
    )


async def test_json_outputs_are_json_lines_even_when_empty(kafka: KafkaSettings) -> None:
    env = _env(**to_env(kafka), CALLSTREAM_LOG_LEVEL="WARNING")
    # The dead-letter topic of this test's fresh topic does not exist: no letters, no prose.
    dlq = await asyncio.to_thread(run_cli, "dlq", "list", "--json", env=env)
    assert (dlq.returncode, dlq.stdout) == (0, ""), dlq.stderr
    consumers = await asyncio.to_thread(run_cli, "consumers", "--json", env=env)
    assert consumers.returncode == 0, consumers.stderr
    assert [orjson.loads(line)["name"] for line in consumers.stdout.splitlines()] == [
        "storage",
        "alerting",
        "metrics",
    ]


def test_a_command_says_nothing_on_stderr_when_all_is_well() -> None:
    # The "starting callstream-settings" line was noise on a person's terminal.
    done = run_cli("settings", "--env-example", env=_env())
    assert done.returncode == 0
    assert done.stderr == ""


def test_run_reads_the_env_file_in_the_working_directory(tmp_path: Path) -> None:
    # Were .env not read, `run` would go on to start a broker and the services: a new
    # session lets the whole tree be stopped then, and the exit code says it went wrong.
    (tmp_path / ".env").write_text("CALLSTREAM_LOG_LEVEL=from-the-env-file\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "callstream", "run"],
        cwd=tmp_path,
        env=_env(PYTHONPATH=str(REPO), CALLSTREAM_HOME=str(tmp_path / "home")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.communicate(timeout=60)
            # The local broker runs detached from the command that started it.
            run_cli("kafka", "stop", env=_env(CALLSTREAM_HOME=str(tmp_path / "home")))
    assert process.returncode == 2, stderr
    assert "CALLSTREAM_LOG_LEVEL='from-the-env-file'" in stderr


def test_a_reader_that_goes_away_is_not_an_error(kafka: KafkaSettings) -> None:
    """`callstream tail | head -1`: once the reader has its line and closes the pipe, the
    command ends quietly with 0, not `Broken pipe` and exit 2."""
    asyncio.run(produce_reports(kafka, [sample_report() for _ in range(200)]))
    env = os.environ | to_env(kafka) | {"CALLSTREAM_LOG_LEVEL": "WARNING"}
    with subprocess.Popen(
        [sys.executable, "-m", "callstream", "tail", "--max", "200"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        assert orjson.loads(process.stdout.readline())
        process.stdout.close()
        code = process.wait(120)
        errors = process.stderr.read().decode()
    assert code == 0, errors
    assert "Broken pipe" not in errors
