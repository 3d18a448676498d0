"""The workers' shared memory of recent deliveries (ingress/sharedreplays.py), across real
processes: each "worker" here is a process of its own that maps the same table."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from ingress.sharedreplays import (
    MAX_BODY_BYTES,
    WAYS,
    ReplayTable,
    SharedDeliveries,
    create_table,
)

WINDOW = 600.0
WAIT = 30.0
KEY = "1700000000:" + "ab" * 32
SPAWN = multiprocessing.get_context("spawn")


def accepted(body: bytes) -> Callable[[], Awaitable[web.Response]]:
    async def handle() -> web.Response:
        return web.Response(status=202, body=body, content_type="application/json")

    return handle


def unexpected() -> Callable[[], Awaitable[web.Response]]:
    async def handle() -> web.Response:
        raise AssertionError("a replay was handled again")

    return handle


def worker(
    table: str, key: str, status: int, body: bytes, started: str, go: str, window: float
) -> None:
    """Another worker: handles `key` with `status`/`body`, writing `started` once it holds the
    claim and answering only when `go` exists ("" for at once)."""

    async def handle() -> web.Response:
        await asyncio.to_thread(Path(started).touch)
        if go:
            await until("told to answer", Path(go).exists)
        return web.Response(status=status, body=body, content_type="application/json")

    async def main() -> None:
        deliveries = SharedDeliveries(Path(table), window, WAIT)
        try:
            await deliveries.answer(key, handle)
        finally:
            deliveries.close()

    asyncio.run(main())


def start_worker(
    tmp_path: Path,
    table: Path,
    *,
    status: int = 202,
    body: bytes = b'{"first":true}',
    hold: bool = False,
    window: float = WINDOW,
) -> tuple[multiprocessing.process.BaseProcess, Path]:
    started, go = tmp_path / "started", tmp_path / "go"
    process = SPAWN.Process(
        target=worker,
        args=(str(table), KEY, status, body, str(started), str(go) if hold else "", window),
    )
    process.start()
    return process, go


async def until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.02)


def finished(process: multiprocessing.process.BaseProcess) -> None:
    process.join(60)
    assert process.exitcode == 0


async def answered(
    table: Path, handle: Callable[[], Awaitable[web.Response]], window: float = WINDOW
) -> tuple[web.Response, bool]:
    """KEY's answer in this process, a worker of its own."""
    deliveries = SharedDeliveries(table, window, WAIT)
    try:
        return await deliveries.answer(KEY, handle)
    finally:
        deliveries.close()


def new_table(tmp_path: Path, capacity: int = 1024) -> Path:
    path = tmp_path / "replays"
    create_table(path, capacity)
    return path


async def test_a_delivery_answered_by_another_process_is_answered_from_the_table(
    tmp_path: Path,
) -> None:
    """Oracle: process A handles a delivery (202, its body); process B, given the same key,
    gets A's status, body and content type, marked replayed, without handling it."""
    table = new_table(tmp_path)
    other, _ = start_worker(tmp_path, table)
    finished(other)
    response, replayed = await answered(table, unexpected())
    assert replayed
    assert (response.status, response.body, response.content_type) == (
        202,
        b'{"first":true}',
        "application/json",
    )


async def test_a_replay_waits_for_the_other_process_still_handling_the_first(
    tmp_path: Path,
) -> None:
    """Oracle: while process A holds its claim (its handler has started, not answered), B's
    copy does not answer; once A answers, B gets A's answer as a replay."""
    table = new_table(tmp_path)
    other, go = start_worker(tmp_path, table, hold=True)
    await until("the other process claimed", (tmp_path / "started").exists)
    deliveries = SharedDeliveries(table, WINDOW, WAIT)
    try:
        waiting = asyncio.create_task(deliveries.answer(KEY, unexpected()))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        go.touch()
        response, replayed = await waiting
    finally:
        deliveries.close()
    finished(other)
    assert replayed
    assert response.body == b'{"first":true}'


async def test_the_claim_of_a_killed_process_is_void(tmp_path: Path) -> None:
    """Oracle: process A claims a delivery and is SIGKILLed before answering; B's copy is
    then handled by B (not replayed) instead of waiting for an answer that never comes."""
    table = new_table(tmp_path)
    other, _ = start_worker(tmp_path, table, hold=True)
    await until("the other process claimed", (tmp_path / "started").exists)
    assert other.pid is not None
    os.kill(other.pid, signal.SIGKILL)
    other.join(60)
    deliveries = SharedDeliveries(table, WINDOW, WAIT)
    try:
        response, replayed = await deliveries.answer(KEY, accepted(b'{"second":true}'))
        again, replayed_again = await deliveries.answer(KEY, unexpected())
    finally:
        deliveries.close()
    assert not replayed
    assert response.body == b'{"second":true}'
    assert replayed_again
    assert again.body == b'{"second":true}'


async def test_a_refused_delivery_is_not_remembered(tmp_path: Path) -> None:
    """Oracle: process A's copy got a 503; B's copy is handled anew (only a 2xx is kept)."""
    table = new_table(tmp_path)
    other, _ = start_worker(tmp_path, table, status=503)
    finished(other)
    response, replayed = await answered(table, accepted(b"{}"))
    assert (response.status, replayed) == (202, False)


async def test_an_answer_too_long_for_a_slot_is_not_remembered(tmp_path: Path) -> None:
    """Oracle: a 2xx body over MAX_BODY_BYTES is answered, but a copy of the delivery is
    handled anew rather than answered with a truncated body."""
    table = new_table(tmp_path)
    other, _ = start_worker(tmp_path, table, body=b"x" * (MAX_BODY_BYTES + 1))
    finished(other)
    response, replayed = await answered(table, accepted(b"{}"))
    assert (response.body, replayed) == (b"{}", False)


async def test_an_answer_is_forgotten_once_its_window_has_passed(tmp_path: Path) -> None:
    """Oracle: with a 0.5 s window, B's copy 0.5 s after A answered is a new delivery, and
    the sweep leaves the table empty."""
    table = new_table(tmp_path)
    other, _ = start_worker(tmp_path, table, window=0.5)
    finished(other)
    await asyncio.sleep(0.6)
    view = ReplayTable(table, 0.5)
    try:
        assert view.sweep(time.monotonic()) == 0
    finally:
        view.close()
    response, replayed = await answered(table, accepted(b"{}"), 0.5)
    assert (response.body, replayed) == (b"{}", False)


async def test_the_table_holds_at_most_its_capacity_and_keeps_the_newest(
    tmp_path: Path,
) -> None:
    """Oracle: 64 slots, 2,000 distinct deliveries answered by two processes in turn: the
    file keeps its size, at most 64 deliveries are remembered, and the last one still is."""
    capacity = 8 * WAYS
    table = new_table(tmp_path, capacity)
    size = table.stat().st_size
    other, _ = start_worker(tmp_path, table)
    finished(other)
    deliveries = SharedDeliveries(table, WINDOW, WAIT)
    try:
        for i in range(2_000):
            await deliveries.answer(f"{i}:{'cd' * 32}", accepted(str(i).encode()))
        assert len(deliveries) <= capacity
        last, replayed = await deliveries.answer(f"1999:{'cd' * 32}", unexpected())
    finally:
        deliveries.close()
    assert (last.body, replayed) == (b"1999", True)
    assert table.stat().st_size == size
