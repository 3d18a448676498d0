"""Long commands show how far they got: a bar when a person watches on a terminal, plain
lines when their stderr goes to a log. Run as `callstream ...` processes against the real
broker, with stderr on a pseudo terminal (the stdlib's pty) or on a pipe."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import uuid
from collections.abc import Mapping
from pathlib import Path

from core.kafkasettings import KafkaSettings
from tests.integration.test_dlq import Fussy, dead_letters
from tests.integration.test_replay import HOUR, NOW, ordered_reports, produce_at
from tests.support.cli import callstream
from tests.support.produce import produce_reports, sample_report
from tests.support.runner import eventually, running

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


async def fussy_dead_letters(kafka: KafkaSettings, count: int) -> None:
    """`count` real dead letters of the consumer "fussy", written by the real runner."""
    refused = await produce_reports(kafka, [sample_report() for _ in range(count)])
    async with running(Fussy(set(refused)), kafka, f"g-fussy-{uuid.uuid4().hex[:8]}"):

        async def all_there() -> bool:
            return len(await dead_letters(kafka)) == count

        await eventually(all_there, timeout=90)


async def on_terminal(
    kafka: KafkaSettings, *args: str, env: Mapping[str, str] | None = None
) -> tuple[int, str, str]:
    """Exit code, stdout, and what `callstream ARGS` drew on its terminal (stderr)."""
    terminal, child_side = pty.openpty()
    drawn = asyncio.create_task(asyncio.to_thread(_read_until_closed, terminal))
    try:
        code, out, _ = await callstream(
            kafka, *args, stderr=child_side, extra_env={"TERM": "xterm", **(env or {})}
        )
    finally:
        os.close(child_side)
    try:
        screen = await asyncio.wait_for(drawn, 30)
    finally:
        os.close(terminal)
    return code, out, screen.decode(errors="replace")


def _read_until_closed(fd: int) -> bytes:
    # Read all along: a pty holds only a few kB, and a full one would block the child.
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every child-side descriptor is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def test_redrive_on_a_terminal_draws_a_bar(kafka: KafkaSettings) -> None:
    await fussy_dead_letters(kafka, 3)

    code, out, screen = await on_terminal(kafka, "dlq", "redrive", "--consumer", "fussy")

    assert code == 0, screen
    assert f"re-drove 3 onto {kafka.topic}" in out
    assert "\x1b[" in screen, "a bar is drawn with terminal control sequences"
    assert "━" in screen
    text = _ANSI.sub("", screen)
    assert re.search(r"re-drive fussy\s.*━+.*100%\s+3/3 dead letters", text), text


async def test_redrive_into_a_log_writes_plain_lines(kafka: KafkaSettings) -> None:
    await fussy_dead_letters(kafka, 3)

    code, out, err = await callstream(kafka, "dlq", "redrive", "--consumer", "fussy")

    assert code == 0, err
    assert f"re-drove 3 onto {kafka.topic}" in out
    assert "\r" not in err
    assert "\x1b" not in err
    lines = [line for line in err.splitlines() if line.startswith("re-drive fussy")]
    assert lines, err
    assert re.fullmatch(r"re-drive fussy: 3/3 dead letters \(100%\), \d+/s, 0s left", lines[-1])


async def test_replay_on_a_terminal_draws_a_bar(kafka: KafkaSettings, tmp_path: Path) -> None:
    await produce_at(kafka, ordered_reports(6, NOW - 2 * HOUR))
    since, until = (NOW - 3 * HOUR).isoformat(), (NOW - HOUR).isoformat()
    database = {"CALLSTREAM_SQLITE_PATH": str(tmp_path / "callstream.db")}

    code, out, screen = await on_terminal(
        kafka, "replay", "--consumer", "storage", "--from", since, "--to", until, env=database
    )

    assert code == 0, screen
    assert "replayed 6 of 6 record(s) through storage" in out
    assert "━" in screen
    text = _ANSI.sub("", screen)
    assert re.search(r"replay storage\s.*━+.*100%\s+6/6 records", text), text
