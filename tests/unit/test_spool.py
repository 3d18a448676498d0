"""The local spool against real files: what `append` acknowledged is read back, in order,
after any restart, and nothing it refused is ever read back.

Oracle throughout: every payload whose `append` returned is handed back by `read` (in
arrival order) until it is committed; a payload whose `append` raised is never handed back.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from core.kafkasettings import KafkaSettings
from core.settings import SettingsError
from ingress.publisher import OutgoingRecord, decode_record, encode_record
from ingress.settings import IngressSettings
from ingress.spool import Spool, SpoolFull, SpoolLocked, SpoolWriteFailed
from ingress.spoolformat import HEADER_BYTES, Position, read_pending, segment_name
from ingress.telemetry import SpoolMetrics
from tests.support.disk import small_disk

MiB = 1024 * 1024


def _spool(directory: Path, **options: object) -> Spool:
    settings: dict[str, object] = {"max_bytes": 64 * MiB, "max_age_seconds": 3600.0}
    return Spool(directory, **(settings | options))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def opened(directory: Path, **options: object) -> AsyncIterator[Spool]:
    spool = _spool(directory, **options)
    await spool.open()
    try:
        yield spool
    finally:
        await spool.close()


async def drain_all(spool: Spool, batch: int = 1000) -> list[bytes]:
    out: list[bytes] = []
    while spool.depth():
        items = await spool.read(batch, 64 * MiB)
        out += [item.payload for item in items if item.payload is not None]
        await spool.commit(items[-1])
    return out


async def append_until_refused(
    spool: Spool, items: list[bytes]
) -> tuple[list[bytes], Exception | None]:
    kept: list[bytes] = []
    for item in items:
        try:
            await spool.append(item)
        except Exception as exc:
            return kept, exc
        kept.append(item)
    return kept, None


def payloads(count: int, size: int = 100) -> list[bytes]:
    return [f"{i:06d}".encode() + b"x" * (size - 6) for i in range(count)]


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


async def test_concurrent_appends_share_fsyncs(tmp_path: Path) -> None:
    """Oracle: 200 concurrent appends all become durable with far fewer than 200 fsyncs."""
    syncs = 0

    def slow_sync(fd: int) -> None:
        nonlocal syncs
        syncs += 1
        time.sleep(0.02)  # a slow disk: callers arriving meanwhile join the next batch
        os.fdatasync(fd)

    async with opened(tmp_path / "spool", sync=slow_sync) as spool:
        syncs = 0
        data = payloads(200)
        await asyncio.gather(*(spool.append(item) for item in data))
        assert spool.depth() == 200
        assert 1 <= syncs <= 4, f"{syncs} fsyncs for 200 appends: no group commit"
        assert sorted(await drain_all(spool)) == sorted(data)


async def test_append_returns_only_after_fsync(tmp_path: Path) -> None:
    """Oracle: while the fsync has not returned, the append has not returned either."""
    release = asyncio.Event()
    loop = asyncio.get_running_loop()
    entered = asyncio.Event()

    def gated_sync(fd: int) -> None:
        loop.call_soon_threadsafe(entered.set)
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(10)
        os.fdatasync(fd)

    async with opened(tmp_path / "spool") as spool:
        spool._sync = gated_sync  # after open: the segment header's own fsync is not gated
        task = asyncio.create_task(spool.append(b"report"))
        await asyncio.wait_for(entered.wait(), 5)
        await asyncio.sleep(0.05)
        assert not task.done()
        release.set()
        await asyncio.wait_for(task, 5)
        assert spool.depth() == 1


async def test_torn_tail_is_ignored_after_a_crash(tmp_path: Path) -> None:
    """Oracle: records before a half-written frame survive, the torn frame is not a record,
    and new appends go after the survivors."""
    directory = tmp_path / "spool"
    data = payloads(5, 300)
    async with opened(directory) as spool:
        for item in data:
            await spool.append(item)
    [segment] = [path for path in segments(directory) if path.stat().st_size > HEADER_BYTES]
    size = segment.stat().st_size
    os.truncate(segment, size - 100)  # the last frame loses its tail: a torn write

    async with opened(directory) as spool:
        assert spool.depth() == 4
        await spool.append(b"after restart")
        assert await drain_all(spool) == [*data[:4], b"after restart"]
    assert list(directory.glob("*.unreadable")), "the torn bytes were not set aside"


async def test_zero_filled_tail_is_dropped_quietly(tmp_path: Path) -> None:
    """Oracle: a file that grew with zeros (data never reached the disk) costs no record."""
    directory = tmp_path / "spool"
    async with opened(directory) as spool:
        await spool.append(b"kept")
    [segment] = [path for path in segments(directory) if path.stat().st_size > HEADER_BYTES]
    with segment.open("ab") as fh:
        fh.write(b"\0" * 4096)
    async with opened(directory) as spool:
        assert await drain_all(spool) == [b"kept"]
    assert not list(directory.glob("*.unreadable"))


async def test_crc_mismatch_is_detected_on_open(tmp_path: Path) -> None:
    """Oracle: a flipped byte inside a record makes that record (and what follows in its
    segment, whose framing can no longer be trusted) unreadable, never a wrong payload."""
    directory = tmp_path / "spool"
    data = payloads(3, 200)
    async with opened(directory) as spool:
        positions = [await spool.append(item) for item in data]
    second = positions[1]
    path = directory / segment_name(second.segment)
    raw = bytearray(path.read_bytes())
    raw[second.offset + second.size - 1] ^= 0xFF
    path.write_bytes(bytes(raw))

    async with opened(directory) as spool:
        assert await drain_all(spool) == data[:1]
    [aside] = directory.glob("*.unreadable")
    assert aside.read_bytes() == bytes(raw[second.offset :])


async def test_crc_mismatch_is_detected_on_read(tmp_path: Path) -> None:
    """Oracle: a record corrupted on disk after it was written is handed back as unreadable
    (payload None), and its neighbours are still delivered."""
    directory = tmp_path / "spool"
    data = payloads(3, 200)
    async with opened(directory) as spool:
        positions = [await spool.append(item) for item in data]
        second = positions[1]
        with (directory / segment_name(second.segment)).open("r+b") as fh:
            fh.seek(second.offset + second.size - 1)
            fh.write(b"?")
        items = await spool.read(10, MiB)
        assert [item.payload for item in items] == [data[0], None, data[2]]
        await spool.commit(items[-1])
        assert spool.depth() == 0
    assert list(directory.glob("*.unreadable"))


async def test_scan_sees_every_intact_pending_payload_in_order_and_changes_nothing(
    tmp_path: Path,
) -> None:
    """Oracle: a scan (how the publisher learns which calls a previous run spooled) hands
    every pending payload that reads back intact to the visitor, in arrival order, skipping
    a corrupted one without setting it aside; committed payloads are not scanned; the drain
    that follows still sees everything pending (the corrupted one as unreadable)."""
    directory = tmp_path / "spool"
    data = payloads(5, 200)
    async with opened(directory) as spool:
        positions = [await spool.append(item) for item in data]
        [first] = await spool.read(1, MiB)
        await spool.commit(first)
        third = positions[2]
        with (directory / segment_name(third.segment)).open("r+b") as fh:
            fh.seek(third.offset + third.size - 1)
            fh.write(b"?")
        assert await spool.scan_pending(bytes.upper) == [d.upper() for d in data[1:2] + data[3:]]
        assert not list(directory.glob("*.unreadable"))
        assert spool.depth() == 4
        items = await spool.read(10, MiB)
        assert [item.payload for item in items] == [data[1], None, data[3], data[4]]


async def test_order_is_kept_across_segments_and_restarts(tmp_path: Path) -> None:
    """Oracle: with segments rolling every few records and a restart between partial drains,
    the payloads come back exactly in append order, and drained segments are deleted."""
    directory = tmp_path / "spool"
    data = payloads(120, 500)
    async with opened(directory, segment_bytes=4096) as spool:
        for item in data:
            await spool.append(item)
        assert len(segments(directory)) > 10
        got: list[bytes] = []
        items = await spool.read(37, MiB)
        got += [item.payload for item in items if item.payload is not None]
        await spool.commit(items[-1])
    async with opened(directory, segment_bytes=4096) as spool:
        assert spool.depth() == len(data) - 37
        items = await spool.read(20, MiB)
        got += [item.payload for item in items if item.payload is not None]
        await spool.commit(items[-1])
        await spool.append(b"late")
    async with opened(directory, segment_bytes=4096) as spool:
        got += await drain_all(spool, batch=9)
        assert got == [*data, b"late"]
        # The writer rolls away from the drained segment in the background (two fsyncs).
        deadline = time.monotonic() + 10
        while len(segments(directory)) != 1:
            assert time.monotonic() < deadline, segments(directory)
            await asyncio.sleep(0.05)
        remaining = segments(directory)
        assert remaining[0].stat().st_size == HEADER_BYTES


async def test_failed_batch_is_taken_back_out_even_across_a_roll(tmp_path: Path) -> None:
    """Oracle: when the fsync of a batch fails after part of it was already fsync'd into an
    earlier segment, every append of the batch raises and none of it is read back, in this
    run or after a restart."""
    directory = tmp_path / "spool"
    calls = 0

    def failing_third_sync(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:  # chunk in segment A, header of segment B, then chunk in B fails
            raise OSError(errno.EIO, "Input/output error (simulated)")
        os.fdatasync(fd)

    async with opened(directory, segment_bytes=1000) as spool:
        await spool.append(b"before")
        spool._sync = failing_third_sync
        outcomes = await asyncio.gather(
            *(spool.append(item) for item in payloads(10, 300)), return_exceptions=True
        )
        assert all(isinstance(o, SpoolWriteFailed) for o in outcomes), outcomes
        assert calls == 3
        assert spool.depth() == 1
        await spool.append(b"after")
        assert spool.depth() == 2
    async with opened(directory) as spool:
        assert await drain_all(spool) == [b"before", b"after"]


async def test_lost_cursor_means_duplicates_not_loss(tmp_path: Path) -> None:
    """Oracle: with the progress file unreadable, every record still on disk is delivered
    again: duplicates, never a gap."""
    directory = tmp_path / "spool"
    data = payloads(10)
    async with opened(directory, segment_bytes=1 << 20) as spool:
        for item in data:
            await spool.append(item)
        items = await spool.read(4, MiB)
        await spool.commit(items[-1])
    (directory / "cursor").write_bytes(b"garbage garbage garbage!")
    async with opened(directory) as spool:
        assert await drain_all(spool) == data


async def test_bytes_bound_raises_spool_full_until_drained(tmp_path: Path) -> None:
    """Oracle: an append past max_bytes raises SpoolFull and is never read back; room made
    by draining is usable again."""
    async with opened(tmp_path / "spool", max_bytes=2000) as spool:
        kept, refusal = await append_until_refused(spool, payloads(100, 300))
        assert isinstance(refusal, SpoolFull)
        assert 0 < len(kept) < 100
        assert not spool.has_room() or spool.pending_bytes() + 316 > 2000
        assert await drain_all(spool) == kept
        await spool.append(b"room again")
        assert await drain_all(spool) == [b"room again"]


async def test_age_bound_raises_spool_full(tmp_path: Path) -> None:
    """Oracle: once the oldest pending record is older than max_age, appends are refused
    (and readiness says there is no room) until it is drained."""
    now = [1_000_000.0]
    async with opened(tmp_path / "spool", max_age_seconds=60.0, clock=lambda: now[0]) as spool:
        await spool.append(b"old")
        now[0] += 61
        assert spool.oldest_age_seconds() == pytest.approx(61, abs=0.01)
        assert not spool.has_room()
        with pytest.raises(SpoolFull):
            await spool.append(b"refused")
        assert await drain_all(spool) == [b"old"]
        await spool.append(b"accepted")
        assert await drain_all(spool) == [b"accepted"]


async def test_reopen_sees_what_a_previous_run_left(tmp_path: Path) -> None:
    """Oracle: a fresh Spool on the same directory hands back exactly the uncommitted
    records, oldest first, with their original age."""
    directory = tmp_path / "spool"
    data = payloads(10)
    async with opened(directory) as spool:
        for item in data:
            await spool.append(item)
        items = await spool.read(3, MiB)
        await spool.commit(items[-1])
    async with opened(directory) as spool:
        assert spool.depth() == 7
        assert spool.oldest_age_seconds() >= 0
        assert await drain_all(spool) == data[3:]


async def test_two_owners_of_one_directory_are_refused(tmp_path: Path) -> None:
    """Oracle: a second Spool on a directory in use fails at open, before touching it."""
    async with opened(tmp_path / "spool"):
        with pytest.raises(SpoolLocked):
            await _spool(tmp_path / "spool").open()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    with small_disk(tmp_path / "disk") as disk:
        yield disk


async def test_disk_full_refuses_and_keeps_what_was_acknowledged(tiny_disk: Path) -> None:
    """Oracle: on ENOSPC the append raises SpoolWriteFailed (the ingress answers 503), every
    earlier append is read back after a restart, the refused one never is, and once space
    is freed by draining the spool accepts again."""
    directory = tiny_disk / "spool"
    async with opened(directory, segment_bytes=256 * 1024) as spool:
        acknowledged, refusal = await append_until_refused(spool, payloads(200, 16 * 1024))
        assert isinstance(refusal, SpoolWriteFailed)
        assert "No space left" in str(refusal)
        assert not spool.writable()
        assert 10 < len(acknowledged) < 200
    async with opened(directory, segment_bytes=256 * 1024) as spool:
        assert spool.depth() == len(acknowledged)
        assert await drain_all(spool) == acknowledged
        await asyncio.sleep(0.1)
        await spool.append(b"space again")
        assert spool.writable()
        assert await drain_all(spool) == [b"space again"]


async def test_a_full_disk_is_logged_once_not_once_per_refused_write(
    tiny_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tiny_disk / "spool"
    async with opened(directory, segment_bytes=256 * 1024) as spool:
        await append_until_refused(spool, payloads(200, 16 * 1024))
        caplog.clear()
        for _ in range(20):
            with pytest.raises(SpoolWriteFailed):
                await spool.append(b"x" * 16 * 1024)
    failures = [r for r in caplog.records if "spool: write failed" in r.getMessage()]
    assert len(failures) <= 1, [r.getMessage() for r in failures]


def test_spooled_record_round_trips() -> None:
    """Oracle: the spool's record encoding gives back exactly the OutgoingRecord."""
    records = [
        OutgoingRecord("t.a", b"call-1", b"\x00value\xff", (("event-type", b"x"), ("e", b""))),
        OutgoingRecord("t.b", None, b"", ()),
    ]
    for record in records:
        assert decode_record(encode_record(record)) == record
    with pytest.raises(ValueError, match="truncated"):
        decode_record(encode_record(records[0])[:-1])


def test_crash_point_setting_is_checked_once_at_start_up() -> None:
    """Oracle: a known crash point is parsed into settings; an unknown one fails start-up."""
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:9")
    env = {"CALLSTREAM_TEST_CRASH_AT": "drain-after-publish-before-delete"}
    assert IngressSettings.from_env(env, kafka=kafka).test_crash_at == (
        "drain-after-publish-before-delete"
    )
    defaults = IngressSettings.from_env({}, kafka=kafka)
    assert defaults.test_crash_at is None
    assert defaults.spool_dir == Path(".callstream/spool")
    assert defaults.kafka_ack_deadline_seconds == 2.0
    with pytest.raises(SettingsError, match="CALLSTREAM_TEST_CRASH_AT"):
        IngressSettings.from_env({"CALLSTREAM_TEST_CRASH_AT": "nope"}, kafka=kafka)


async def test_spool_without_a_directory_is_private_and_removed_at_close() -> None:
    """Oracle: settings built in code (no spool_dir) get their own temporary spool, which
    works like any other and is gone after a clean close."""
    spool = Spool(None, max_bytes=MiB, max_age_seconds=60.0)
    await spool.open()
    directory = spool.directory
    assert directory.is_dir()
    assert directory != Path()
    await spool.append(b"x")
    assert await drain_all(spool) == [b"x"]
    await spool.close()
    assert not directory.exists()


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


async def test_read_pending_lists_what_is_owed_while_the_spool_is_open(tmp_path: Path) -> None:
    """Oracle: what `read` would still hand out, in order, read from outside (no lock) while
    the owning spool is open; a delivered payload is no longer listed, and nothing on disk
    changes by looking."""
    async with opened(tmp_path, segment_bytes=256) as spool:
        for payload in (b"first", b"second", b"x" * 300, b"last"):
            await spool.append(payload)
        [delivered] = await spool.read(1, MiB)
        await spool.commit(delivered)
        before = _files(tmp_path)
        pending = read_pending(tmp_path)
        assert [p.payload for p in pending] == [b"second", b"x" * 300, b"last"]
        assert len({p.position.segment for p in pending}) > 1
        assert all(p.spooled_at_ms > 0 for p in pending)
        assert _files(tmp_path) == before
    assert read_pending(tmp_path) == pending


async def test_a_scrape_during_a_commit_sees_the_records_drained_not_lost(tmp_path: Path) -> None:
    """The records gauge drops as a commit takes records off the spool; the drained counter must
    rise at the same moment, not after the cursor is saved, or a scrape in between sees records
    gone that were counted nowhere (the bench's drain phase stopped on exactly that)."""
    registry = CollectorRegistry()
    metrics = SpoolMetrics(registry)
    saving, resume = threading.Event(), threading.Event()
    async with opened(tmp_path, metrics=metrics) as spool:
        metrics.watch(spool)
        for payload in payloads(5):
            await spool.append(payload)
        items = await spool.read(100, 64 * MiB)
        save_cursor = spool._write_cursor

        def slow_save(cursor: Position) -> None:
            saving.set()
            resume.wait(10)
            save_cursor(cursor)

        spool._write_cursor = slow_save  # type: ignore[method-assign]
        commit = asyncio.create_task(spool.commit(items[-1]))
        try:
            assert await asyncio.to_thread(saving.wait, 10)
            assert registry.get_sample_value("callstream_ingress_spool_records") == 0
            assert registry.get_sample_value("callstream_ingress_spool_drained_total") == 5
        finally:
            resume.set()
            assert await commit == 5
