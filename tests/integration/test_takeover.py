"""A worker drains the spool directories nobody owns (ingress/takeover.py): here the layout a
single ingress process left before CALLSTREAM_INGRESS_WORKERS (segments directly in the spool
directory), found by worker 0 of a multi-worker ingress. On the session broker."""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from callstream.consumerstatus import KafkaInspector
from core.kafkasettings import KafkaSettings
from core.secret import Secret
from core.topicreader import read_range
from ingress.outgoing import OutgoingRecord, encode_record
from ingress.settings import IngressSettings
from ingress.spool import Spool
from ingress.spoolformat import read_pending
from ingress.takeover import worker_dir
from tests.conftest import TEST_SECRET, start_ingress, wait_drained

BACKLOG = 40


async def spool_backlog(directory: Path, topic: str, count: int) -> list[bytes]:
    """`count` records spooled as a run with Kafka away leaves them; their values."""
    values = [f"left-{i:03d}-{uuid.uuid4().hex}".encode() for i in range(count)]
    spool = Spool(directory, max_bytes=1 << 30, max_age_seconds=3600)
    await spool.open()
    try:
        for value in values:  # one at a time: the arrival order is the list's
            await spool.append(encode_record(OutgoingRecord(topic, b"one-call", value, ())))
    finally:
        await spool.close()
    return values


async def values_on(kafka: KafkaSettings, topic: str) -> list[bytes]:
    async with KafkaInspector(kafka) as look:
        start, end = await look.log_offsets(topic, await look.partitions(topic))
    return [raw.value async for raw in read_range(kafka, topic, start, end)]


async def wait_for(what: str, check: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.2)


async def test_a_worker_drains_the_spool_a_single_process_left_once_its_lock_is_free(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    """Oracle: records left in <spool dir> itself are not touched while a process holds its
    lock; once it lets go, worker 0 (spooling to <spool dir>/worker-0) sends every one to
    Kafka in arrival order, empties the directory and releases its lock."""
    root = tmp_path / "spool"
    values = await spool_backlog(root, kafka.events_topic, BACKLOG)
    holder = Spool(root, max_bytes=1 << 30, max_age_seconds=3600)
    await holder.open()  # a live single process still owns it
    settings = IngressSettings(
        kafka=kafka,
        host="127.0.0.1",
        port=0,
        webhook_secrets=(Secret(TEST_SECRET),),
        spool_dir=worker_dir(root, 0),
    )
    client = await start_ingress(replace(settings, kafka_ack_deadline_seconds=5.0))
    try:
        await wait_drained(client)
        # Two scan intervals with Kafka connected: an owned directory stays as it is.
        await asyncio.sleep(12)
        assert len(read_pending(root)) == BACKLOG
        await holder.close()

        await wait_for("the left-over spool drained", lambda: not read_pending(root))
        assert await values_on(kafka, kafka.events_topic) == values
        # Let go of once empty: its next owner (a single process again) opens it at once.
        again = Spool(root, max_bytes=1 << 30, max_age_seconds=3600)
        await wait_for("the lock released", lambda: _lock_free(root))
        await again.open()
        assert again.depth() == 0
        await again.close()
        # Worker 0's own directory stayed its own.
        assert worker_dir(root, 0).is_dir()
        assert not read_pending(worker_dir(root, 0))
    finally:
        await client.close()
        await holder.close()


def _lock_free(directory: Path) -> bool:
    fd = os.open(directory / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True
