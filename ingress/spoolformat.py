"""The spool's bytes on disk: how a directory, a segment and a frame are laid out, and the
few file operations that make them durable. ingress/spool.py builds the queue on these.

Layout of the directory::

    .lock                       flock'd by the one process that owns the spool
    cursor                      drain progress: segment id, offset, CRC32 (fdatasync'd)
    00000000000000000007.seg    segments: 8-byte magic, then frames, append-only
    <segment>.<offset>.unreadable  bytes that failed their CRC, set aside for inspection

A frame is ``u32 body length | u32 CRC32(body) | body`` and a body is
``u64 spooled-at (Unix ms) | payload`` (big-endian). A write torn by a crash leaves a frame
whose length runs past the end of the file or whose CRC does not match; opening the spool
stops reading that segment there, so a torn tail is never mistaken for a record.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from pathlib import Path
from typing import Final, NamedTuple

MAGIC: Final = b"CSSPOOL\x01"
HEADER_BYTES: Final = len(MAGIC)
FRAME = struct.Struct(">II")
SPOOLED_AT = struct.Struct(">Q")
CURSOR = struct.Struct(">QQ")
CURSOR_CRC = struct.Struct(">I")
FRAME_OVERHEAD: Final = FRAME.size + SPOOLED_AT.size
# A sanity bound for the length field: a corrupted length must not make open() allocate
# gigabytes. Reports are at most ~1 MiB; this leaves room for any sane setting.
MAX_PAYLOAD_BYTES: Final = 64 * 1024 * 1024


class Position(NamedTuple):
    segment: int
    offset: int  # of the frame's first byte
    size: int  # of the whole frame


class Entry(NamedTuple):
    position: Position
    spooled_at_ms: int


class Pending(NamedTuple):
    position: Position
    spooled_at_ms: int
    payload: bytes


def segment_name(segment: int) -> str:
    return f"{segment:020d}.seg"


def segment_ids(directory: Path) -> list[int]:
    return sorted(int(path.stem) for path in directory.glob("*.seg") if path.stem.isdigit())


def parse_cursor(raw: bytes) -> tuple[int, int] | None:
    """(segment, offset) the drain has reached; None if the cursor is torn or missing."""
    if len(raw) != CURSOR.size + 4:
        return None
    (crc,) = CURSOR_CRC.unpack_from(raw, CURSOR.size)
    if zlib.crc32(raw[: CURSOR.size]) != crc:
        return None
    return CURSOR.unpack_from(raw)


def read_pending(directory: Path) -> list[Pending]:
    """What a spool directory still owes Kafka, oldest first, read without the spool's lock
    and without changing a byte: for a look from outside (`callstream trace`) while the
    ingress may be running. A frame the ingress is writing at this moment fails its CRC and
    is left out, as opening the spool would."""
    cursor_path = directory / "cursor"
    raw = cursor_path.read_bytes()[: CURSOR.size + 4] if cursor_path.exists() else b""
    cursor = parse_cursor(raw) or (0, 0)
    out: list[Pending] = []
    for segment in segment_ids(directory):
        try:
            data = (directory / segment_name(segment)).read_bytes()
        except FileNotFoundError:
            continue  # drained and deleted since we listed it
        if data[:HEADER_BYTES] != MAGIC:
            continue
        entries, _ = scan_frames(data)
        for entry in entries:
            start, size = entry.position.offset, entry.position.size
            if (segment, start) >= cursor:
                payload = data[start + FRAME_OVERHEAD : start + size]
                out.append(Pending(Position(segment, start, size), entry.spooled_at_ms, payload))
    return out


def encode_frame(payload: bytes, spooled_at_ms: int) -> bytes:
    body = SPOOLED_AT.pack(spooled_at_ms) + payload
    return FRAME.pack(len(body), zlib.crc32(body)) + body


def scan_frames(data: bytes | memoryview, start: int = HEADER_BYTES) -> tuple[list[Entry], int]:
    """Valid frames from `start`, and the offset where the valid prefix ends."""
    view = memoryview(data)
    entries: list[Entry] = []
    offset = start
    while offset + FRAME.size <= len(view):
        length, crc = FRAME.unpack_from(view, offset)
        end = offset + FRAME.size + length
        sane = SPOOLED_AT.size <= length <= MAX_PAYLOAD_BYTES + SPOOLED_AT.size
        if not sane or end > len(view):
            break
        body = view[offset + FRAME.size : end]
        if zlib.crc32(body) != crc:
            break
        (spooled_at,) = SPOOLED_AT.unpack_from(body)
        entries.append(Entry(Position(0, offset, end - offset), spooled_at))
        offset = end
    return entries, offset


def open_for_update(path: Path) -> int:
    """Read-write, created if missing; read-only where the disk is, so a read-only spool
    can still be read and drained (its progress is then not saved: a restart re-sends)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
        return os.open(path, os.O_RDONLY)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def truncate_durably(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
