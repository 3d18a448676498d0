"""A durable first-in-first-out queue of byte payloads on local disk.

The ingress writes a report here when Kafka does not acknowledge it in time, so that a 2xx can
still mean "this report will reach every consumer". This module knows nothing about Kafka: it
stores opaque payloads, fsyncs them before `append` returns, and hands them back in arrival
order until `commit` says they were delivered.

The directory's layout and the frame format: ingress/spoolformat.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, TypeVar

from core.logs import Throttled
from ingress.spoolformat import (
    CURSOR,
    CURSOR_CRC,
    FRAME_OVERHEAD,
    HEADER_BYTES,
    MAGIC,
    MAX_PAYLOAD_BYTES,
    Entry,
    Position,
    encode_frame,
    fsync_dir,
    open_for_update,
    parse_cursor,
    scan_frames,
    segment_ids,
    segment_name,
    truncate_durably,
    write_all,
)
from ingress.telemetry import SpoolMetrics

log = logging.getLogger(__name__)

T = TypeVar("T")

CrashPoint = Literal[
    "spool-after-write-before-fsync",
    "spool-after-fsync-before-response",
    "drain-after-publish-before-delete",
]
CRASH_EXIT_CODE: Final = 99

# One group commit writes at most this much, so one huge burst cannot hold every caller
# behind a single long write.
MAX_BATCH_BYTES: Final = 8 * 1024 * 1024
# After a failed write or fsync the spool reports itself unwritable for this long (unless a
# later write succeeds first), so /readyz steers traffic away from a failing disk.
FAILURE_MEMORY_SECONDS: Final = 5.0
LOCK_POLL_SECONDS: Final = 0.1


class SpoolError(Exception):
    """The payload was not made durable; the caller must not acknowledge it."""


class SpoolFull(SpoolError):
    """A bound (bytes, or age of the oldest pending payload) is reached."""


class SpoolWriteFailed(SpoolError):
    """The write or the fsync failed (disk full, I/O error) or the spool is closed."""


class SpoolLocked(SpoolError):
    """Another process owns this spool directory."""


@dataclass(frozen=True, slots=True)
class Spooled:
    """A payload handed back for delivery; `payload` is None when its bytes failed the CRC
    on reading (they were set aside; commit past it like any other)."""

    position: Position
    spooled_at_ms: int
    payload: bytes | None


@dataclass(slots=True)
class _Pending:
    frame: bytes
    spooled_at_ms: int
    done: asyncio.Future[Position]


class Spool:
    """Append with group commit, read from the head, commit what was delivered.

    One writer task owns the active segment: every `append` queues its frame and awaits a
    future; the writer takes everything queued, writes it with one write and one fdatasync,
    then resolves all those futures. Callers arriving during an fsync form the next batch,
    so the fsync rate stays bounded by the disk while throughput grows with concurrency.
    """

    def __init__(
        self,
        directory: Path | None,
        *,
        max_bytes: int,
        max_age_seconds: float,
        segment_bytes: int = 64 * 1024 * 1024,
        metrics: SpoolMetrics | None = None,
        crash_at: CrashPoint | None = None,
        sync: Callable[[int], None] = os.fdatasync,
        clock: Callable[[], float] = time.time,
        lock_wait_seconds: float = 0.0,
    ) -> None:
        # None: a private temporary directory, made at open and removed at close if empty.
        self._ephemeral = directory is None
        self._ephemeral_dir: Path | None = None  # only ever this is removed at close
        self.directory = Path(directory) if directory is not None else Path()
        self._max_bytes = max_bytes
        self._max_age_seconds = max_age_seconds
        self._segment_bytes = segment_bytes
        self._metrics = metrics
        self._crash_at = crash_at
        self._sync = sync
        self._clock = clock
        # A sibling worker may be draining this directory (ingress/takeover.py): it lets go
        # within one batch, so the owner waits that long for the lock before giving up.
        self._lock_wait_seconds = lock_wait_seconds

        self._lock_fd: int | None = None
        self._cursor_fd: int | None = None
        self._active_id = 0
        self._writing_from: int | None = None
        self._active_fd: int | None = None
        self._active_size = 0
        # After a failed write the active segment's tail is suspect: the next batch goes to a
        # fresh segment.
        self._abandon_active = False
        self._roll_requested = False

        self._queue: list[_Pending] = []
        self._queued_bytes = 0
        self._writing_bytes = 0
        self._pending: deque[Entry] = deque()
        self._pending_bytes = 0
        self._has_pending = asyncio.Event()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._collect_lock = asyncio.Lock()
        self._last_failure: float | None = None
        # A full disk fails every batch while Kafka is away: one line per few seconds.
        self._write_errors = Throttled(log)
        # The last write (of a record or a segment header) failed and none has succeeded
        # since: a full or read-only disk. Unlike _last_failure it does not fade.
        self._failing = False
        # Set when an append was refused for lack of bytes, cleared by the next commit: from
        # then on the spool says it has no room, even if a smaller payload would still fit.
        self._refused_full = False
        self._closed = True

        if metrics is not None:
            metrics.watch(self)

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        await asyncio.to_thread(self._open_sync)
        self._closed = False
        if self._pending:
            self._has_pending.set()
        self._writer = asyncio.create_task(self._write_loop(), name="spool-writer")

    async def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._wake.set()
            # The writer exits once the queue is empty; a hung disk must not hang shutdown
            # for ever, though.
            await finish_or_cancel(self._writer, 30)
            self._writer = None
        for pending in self._queue:
            pending.done.set_exception(SpoolWriteFailed("the spool is closed"))
        self._queue.clear()
        for fd in (self._active_fd, self._cursor_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._active_fd = self._cursor_fd = self._lock_fd = None
        if self._ephemeral_dir is not None:
            if self._pending:
                log.error(
                    "spool: %d undelivered record(s) left in the temporary spool %s",
                    len(self._pending),
                    self._ephemeral_dir,
                )
            else:
                await asyncio.to_thread(shutil.rmtree, self._ephemeral_dir, True)
            self._ephemeral_dir = None

    def _open_sync(self) -> None:
        if self._ephemeral:
            self.directory = self._ephemeral_dir = Path(
                tempfile.mkdtemp(prefix="callstream-spool-")
            )
        directory = self.directory
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        if created:
            fsync_dir(directory.parent)
        lock_fd = open_for_update(directory / ".lock")
        deadline = time.monotonic() + self._lock_wait_seconds
        while True:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(LOCK_POLL_SECONDS)
                    continue
                os.close(lock_fd)
                raise SpoolLocked(f"another process is using the spool in {directory}") from None
        self._lock_fd = lock_fd
        try:
            self._recover()
        except BaseException:
            os.close(lock_fd)
            self._lock_fd = None
            raise

    def _recover(self) -> None:
        directory = self.directory
        cursor_path = directory / "cursor"
        cursor_existed = cursor_path.exists()
        self._cursor_fd = open_for_update(cursor_path)
        cursor = self._read_cursor()
        segments = segment_ids(directory)
        pending = [
            entry
            for segment in segments
            for entry in self._recover_segment(segment)
            if (segment, entry.position.offset) >= cursor
        ]
        keep = {entry.position.segment for entry in pending}
        # Fully drained, or holding nothing readable: nothing in it is owed to anyone.
        drained = [segment for segment in segments if segment not in keep]
        self._pending = deque(pending)
        self._pending_bytes = sum(entry.position.size for entry in pending)
        self._active_id = max(segments, default=0)
        # A full or read-only disk must not keep the ingress from starting: what is spooled
        # still drains, and reports that Kafka acknowledges need no spool. Only a report
        # that would need the spool is refused, until a write succeeds again.
        try:
            if drained or not cursor_existed:
                self._delete_segments(drained)
            self._new_active()  # always a fresh segment: a torn tail is never appended to
        except OSError as exc:
            self._write_failed()
            log.error(
                "spool: %s cannot be written (%s); reports that need it get 503", directory, exc
            )
        if pending:
            log.warning(
                "spool: %d record(s), %d bytes left by a previous run; draining them first",
                len(pending),
                self._pending_bytes,
            )

    def _recover_segment(self, segment: int) -> list[Entry]:
        path = self.directory / segment_name(segment)
        data = path.read_bytes()
        if len(data) < HEADER_BYTES or data[:HEADER_BYTES] != MAGIC:
            if data.strip(b"\0"):
                self._set_aside(path, 0, data)
            # A header is fsync'd before any record is written behind it, so a segment without
            # one never held an acknowledged record.
            return []
        entries, good_end = scan_frames(data)
        if good_end < len(data):
            try:
                self._set_aside(path, good_end, data[good_end:])
                truncate_durably(path, good_end)
            except OSError as exc:
                # Every later open stops reading at the same place, so nothing is lost by
                # leaving the torn tail where it is for now.
                log.warning("spool: could not set aside the torn tail of %s (%s)", path.name, exc)
        return [e._replace(position=e.position._replace(segment=segment)) for e in entries]

    def _set_aside(self, path: Path, offset: int, data: bytes) -> None:
        if not data.strip(b"\0"):
            # Zeros past the end: the file grew but its data never reached the disk. Nothing
            # to inspect, nothing that was acknowledged.
            log.warning(
                "spool: %s has %d zero byte(s) at %d; dropped", path.name, len(data), offset
            )
            return
        aside = path.with_name(f"{path.name}.{offset}.unreadable")
        aside.write_bytes(data)
        with open(aside, "rb") as fh:
            os.fsync(fh.fileno())
        log.error(
            "spool: %d unreadable byte(s) at offset %d of %s (a write torn by a crash, or "
            "corruption); set aside in %s",
            len(data),
            offset,
            path.name,
            aside.name,
        )

    def _read_cursor(self) -> tuple[int, int]:
        assert self._cursor_fd is not None
        raw = os.pread(self._cursor_fd, CURSOR.size + 4, 0)
        found = parse_cursor(raw)
        if found is None and raw.strip(b"\0"):
            log.warning("spool: cursor unreadable; draining from the oldest segment (duplicates)")
        # Without a cursor everything on disk is pending: at worst duplicates, never a loss.
        return found or (0, 0)

    def _write_cursor(self, cursor: Position) -> None:
        assert self._cursor_fd is not None
        raw = CURSOR.pack(cursor.segment, cursor.offset)
        # Overwritten in place: a torn cursor fails its CRC and means "start from the oldest
        # segment", which costs duplicates, never records.
        os.pwrite(self._cursor_fd, raw + CURSOR_CRC.pack(zlib.crc32(raw)), 0)
        os.fdatasync(self._cursor_fd)

    def _new_active(self) -> None:
        """Create the next segment and make it durable before any record goes into it."""
        segment = self._active_id + 1
        path = self.directory / segment_name(segment)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            write_all(fd, MAGIC)
            self._sync(fd)
            fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        if self._active_fd is not None:
            os.close(self._active_fd)
        self._active_id, self._active_fd, self._active_size = segment, fd, HEADER_BYTES
        self._abandon_active = False

    # -- state -----------------------------------------------------------------------------

    def depth(self) -> int:
        """Payloads durably spooled and not yet delivered."""
        return len(self._pending)

    def pending_bytes(self) -> int:
        return self._pending_bytes

    def oldest_age_seconds(self) -> float:
        if not self._pending:
            return 0.0
        return max(0.0, self._clock() - self._pending[0].spooled_at_ms / 1000)

    def empty(self) -> bool:
        """Nothing pending, queued or being written: a new payload may bypass the spool
        without overtaking one that is in it."""
        return not self._pending and not self._queue and not self._writing_bytes

    def has_room(self) -> bool:
        return (
            not self._refused_full
            and self._used_bytes() < self._max_bytes
            and self.oldest_age_seconds() < self._max_age_seconds
        )

    def writable(self) -> bool:
        failed = self._last_failure
        recently_failed = failed is not None and time.monotonic() - failed <= FAILURE_MEMORY_SECONDS
        return not self._closed and not recently_failed

    def failing(self) -> bool:
        """The last write failed and none succeeded since: a report that needs the spool
        now would most likely be refused."""
        return self._failing

    def _write_failed(self) -> None:
        self._last_failure = time.monotonic()
        self._failing = True
        self._abandon_active = True

    def _used_bytes(self) -> int:
        return self._pending_bytes + self._queued_bytes + self._writing_bytes

    # -- append (group commit) -------------------------------------------------------------

    async def append(self, payload: bytes) -> Position:
        """Returns once the payload is on disk and fsync'd; raises SpoolFull or
        SpoolWriteFailed otherwise (then nothing is owed to anyone)."""
        if self._closed:
            raise SpoolWriteFailed("the spool is closed")
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise SpoolWriteFailed(f"a payload of {len(payload)} bytes is too large to spool")
        spooled_at_ms = int(self._clock() * 1000)
        frame = encode_frame(payload, spooled_at_ms)
        if self._used_bytes() + len(frame) > self._max_bytes:
            self._refused_full = True
            raise SpoolFull(f"the spool holds {self._used_bytes()} of {self._max_bytes} bytes")
        age = self.oldest_age_seconds()
        if age >= self._max_age_seconds:
            raise SpoolFull(f"the oldest spooled report is {age:.0f} s old; Kafka must drain it")
        done: asyncio.Future[Position] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(frame, spooled_at_ms, done))
        self._queued_bytes += len(frame)
        self._wake.set()
        # Shielded: a caller that goes away must not leave the future half-owned; the writer
        # still resolves it.
        return await asyncio.shield(done)

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._queue:
                if self._closed:
                    return
                if self._roll_requested:
                    await self._roll_idle()
                continue
            batch, size = self._take_batch()
            self._writing_bytes = size
            # The worker thread may roll to new segments mid-batch; everything from here on
            # holds frames about to be acknowledged and must outlive any collection.
            self._writing_from = self._active_id
            try:
                positions = await asyncio.to_thread(self._write_batch, [p.frame for p in batch])
            except Exception as exc:
                # Anything at all (not only OSError): the writer must survive to serve the
                # next batch, and these callers must hear that nothing was kept.
                self._write_failed()
                self._write_errors.error(
                    "spool: write failed (%s); %d report(s) refused", exc, len(batch)
                )
                for pending in batch:
                    pending.done.set_exception(SpoolWriteFailed(f"spool write failed: {exc}"))
                continue
            finally:
                self._writing_bytes = 0
                self._writing_from = None
            crash("spool-after-fsync-before-response", self._crash_at)
            self._last_failure = None
            self._failing = False
            for pending, position in zip(batch, positions, strict=True):
                self._pending.append(Entry(position, pending.spooled_at_ms))
                self._pending_bytes += position.size
                pending.done.set_result(position)
            self._has_pending.set()
            if self._metrics is not None:
                self._metrics.writes.inc(len(batch))
            if self._queue:
                self._wake.set()

    def _take_batch(self) -> tuple[list[_Pending], int]:
        size = 0
        count = 0
        for pending in self._queue:
            if count and size + len(pending.frame) > MAX_BATCH_BYTES:
                break
            size += len(pending.frame)
            count += 1
        batch, self._queue = self._queue[:count], self._queue[count:]
        self._queued_bytes -= size
        return batch, size

    def _write_batch(self, frames: list[bytes]) -> list[Position]:
        """Runs in a worker thread; the writer task is the only one touching the active
        segment, and it awaits this call. All or nothing: if any part fails, every byte this
        batch wrote is taken back out, so a later restart cannot deliver a report whose
        sender was told to retry (if even the truncation fails, such a report may arrive
        once more: a duplicate of the sender's retry, never a loss)."""
        written: list[tuple[int, int]] = []  # (segment, offset where this batch began in it)
        try:
            if self._abandon_active or self._active_fd is None:
                self._new_active()
            positions: list[Position] = []
            chunk: list[bytes] = []
            for frame in frames:
                if (
                    self._active_size + len(frame) > self._segment_bytes
                    and self._active_size > HEADER_BYTES
                ):
                    self._flush_chunk(chunk, written)
                    chunk = []
                    self._new_active()
                positions.append(Position(self._active_id, self._active_size, len(frame)))
                chunk.append(frame)
                self._active_size += len(frame)
            self._flush_chunk(chunk, written)
        except BaseException:
            for segment, offset in written:
                with contextlib.suppress(OSError):
                    truncate_durably(self.directory / segment_name(segment), offset)
                if segment == self._active_id:
                    self._active_size = offset
            raise
        return positions

    def _flush_chunk(self, chunk: list[bytes], written: list[tuple[int, int]]) -> None:
        if not chunk:
            return
        assert self._active_fd is not None
        data = b"".join(chunk)
        written.append((self._active_id, self._active_size - len(data)))
        write_all(self._active_fd, data)
        crash("spool-after-write-before-fsync", self._crash_at)
        started = time.perf_counter()
        self._sync(self._active_fd)
        if self._metrics is not None:
            self._metrics.fsync_duration.observe(time.perf_counter() - started)

    async def _roll_idle(self) -> None:
        """Everything delivered: start a fresh segment so the drained one can be deleted."""
        self._roll_requested = False
        if self._pending or self._active_size <= HEADER_BYTES:
            return
        try:
            await asyncio.to_thread(self._new_active)
        except OSError as exc:
            log.warning("spool: could not start a new segment (%s); will retry", exc)
            return
        await self._collect()

    # -- drain -----------------------------------------------------------------------------

    async def wait_pending(self) -> None:
        await self._has_pending.wait()

    async def read(self, max_records: int, max_bytes: int) -> list[Spooled]:
        """The oldest pending payloads, in arrival order (at least one if any is pending)."""
        entries: list[Entry] = []
        size = 0
        for entry in self._pending:
            if entries and (len(entries) >= max_records or size + entry.position.size > max_bytes):
                break
            entries.append(entry)
            size += entry.position.size
        if not entries:
            return []
        return await asyncio.to_thread(self._read_entries, entries)

    def _read_entries(self, entries: list[Entry]) -> list[Spooled]:
        out: list[Spooled] = []
        for entry, frame, intact in self._frames(entries):
            position = entry.position
            if not intact:
                path = self.directory / segment_name(position.segment)
                self._set_aside(path, position.offset, frame)
            payload = frame[FRAME_OVERHEAD:] if intact else None
            out.append(Spooled(position, entry.spooled_at_ms, payload))
        return out

    def _frames(self, entries: list[Entry]) -> Iterator[tuple[Entry, bytes, bool]]:
        """Each entry's frame as read back, and whether it passed its CRC."""
        fds: dict[int, int] = {}
        try:
            for entry in entries:
                position = entry.position
                fd = fds.get(position.segment)
                if fd is None:
                    fd = os.open(self.directory / segment_name(position.segment), os.O_RDONLY)
                    fds[position.segment] = fd
                frame = os.pread(fd, position.size, position.offset)
                found, _ = scan_frames(frame, 0)
                yield entry, frame, len(found) == 1 and found[0].position.size == position.size
        finally:
            for fd in fds.values():
                os.close(fd)

    async def scan_pending(self, visit: Callable[[bytes], T]) -> list[T]:
        """`visit` applied, in a worker thread and in arrival order, to every pending
        payload that reads back intact. A frame failing its CRC is left to the drainer, which
        sets it aside; a scan only looks."""
        entries = list(self._pending)
        return await asyncio.to_thread(self._scan, entries, visit)

    def _scan(self, entries: list[Entry], visit: Callable[[bytes], T]) -> list[T]:
        return [
            visit(frame[FRAME_OVERHEAD:]) for _, frame, intact in self._frames(entries) if intact
        ]

    async def commit(self, through: Spooled) -> int:
        """Everything up to and including `through` was delivered: forget it durably and
        delete segments that hold nothing pending. Returns how many payloads were forgotten."""
        count = 0
        while self._pending and self._pending[0].position <= through.position:
            entry = self._pending.popleft()
            self._pending_bytes -= entry.position.size
            count += 1
        if not self._pending:
            self._has_pending.clear()
        # Counted as they leave the depth gauge, so no scrape sees records gone uncounted.
        if self._metrics is not None:
            self._metrics.drained.inc(count)
        self._refused_full = False
        cursor = Position(
            through.position.segment, through.position.offset + through.position.size, 0
        )
        try:
            await asyncio.to_thread(self._write_cursor, cursor)
        except OSError as exc:
            # The payloads are delivered either way; a stale cursor only means a restart
            # delivers them again.
            log.warning("spool: could not save drain progress (%s)", exc)
        await self._collect()
        if self.empty():
            self._roll_requested = True
            self._wake.set()
        return count

    async def _collect(self) -> None:
        async with self._collect_lock:
            floor = self._pending[0].position.segment if self._pending else self._active_id
            if self._writing_from is not None:
                floor = min(floor, self._writing_from)
            segments = await asyncio.to_thread(segment_ids, self.directory)
            doomed = [segment for segment in segments if segment < floor]
            if doomed:
                try:
                    await asyncio.to_thread(self._delete_segments, doomed)
                except OSError as exc:
                    log.warning("spool: could not delete drained segments (%s)", exc)

    def _delete_segments(self, segments: list[int]) -> None:
        for segment in segments:
            (self.directory / segment_name(segment)).unlink(missing_ok=True)
        fsync_dir(self.directory)


async def finish_or_cancel(task: asyncio.Task[None], grace: float) -> None:
    try:
        async with asyncio.timeout(grace):
            await asyncio.shield(task)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def crash(point: CrashPoint, armed: CrashPoint | None) -> None:
    if point != armed:
        return
    log.critical("CALLSTREAM_TEST_CRASH_AT=%s: exiting now, as asked", point)
    logging.shutdown()
    os._exit(CRASH_EXIT_CODE)
