"""Running the `callstream` command against a test's topics, as a user would."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from core.kafkasettings import KafkaSettings
from core.settings import to_env

REPO = Path(__file__).resolve().parents[2]


def without_settings(prefixes: tuple[str, ...] = ("CALLSTREAM_", "KAFKA_")) -> dict[str, str]:
    """This process's environment without callstream's settings: a command then runs on its
    defaults, whatever the shell running the tests has set."""
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def cli_env() -> dict[str, str]:
    # The start-up log line is not what these tests are about.
    return without_settings(("CALLSTREAM_",)) | {"CALLSTREAM_LOG_LEVEL": "WARNING"}


async def callstream(
    kafka: KafkaSettings,
    *args: str,
    stderr: int = asyncio.subprocess.PIPE,
    extra_env: Mapping[str, str] | None = None,
) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `callstream ARGS` pointed at `kafka` (stderr is ""
    when it goes to a descriptor of the caller's, such as a pseudo terminal)."""
    env = os.environ | to_env(kafka) | {"CALLSTREAM_LOG_LEVEL": "WARNING"} | dict(extra_env or {})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callstream",
        *args,
        env=env,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
    )
    stdout, errors = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), (errors or b"").decode()


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`callstream ARGS` from the repository with exactly `env`; blocking, output as text."""
    return subprocess.run(
        [sys.executable, "-m", "callstream", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The one stderr line of a command that failed as a person should see it: exit code 2,
    no traceback."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    return line
