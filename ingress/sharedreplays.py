"""Replay detection for the whole ingress when it runs several workers (ingress/workers.py).

Each worker only sees the connections the kernel gives it, so a memory per process would let
a replay that lands on another worker be published again. The workers therefore share one
table: a file the parent creates and every worker maps (mmap), guarded by an `flock` around
each look-and-claim, answer and drop. The kernel releases a killed worker's flock, and a
claim whose process is gone is void, so no worker can leave the others waiting for ever.

The table is fixed in size: MAX_REMEMBERED slots in buckets of WAYS. A delivery's key is
hashed (blake2b, 16 bytes) to its bucket; a new delivery takes a free or expired slot there,
else the bucket's oldest. Each slot holds the digest, the state (in flight, with the pid
handling it, or answered), when it expires, and the answer (status, content type, body).
An answer too long for a slot is not remembered: a replay of it is handled anew, as one that
came after the window would be.

Semantics are those of ingress/replays.py: the first arrival claims; a replay of an answered
delivery gets the stored answer; a replay of one in flight waits (polling the table, at most
as long as a request may take to be made durable) until it is answered or dropped; only a
2xx is remembered.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import mmap
import os
import struct
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from pathlib import Path

from aiohttp import web

from ingress.replays import MAX_REMEMBERED, SWEEP_INTERVAL_SECONDS, Answer, first_delivery, sweeping

# The path of the table, in the workers' environment only (as PROMETHEUS_MULTIPROC_DIR).
TABLE_ENV = "CALLSTREAM_INGRESS_REPLAY_TABLE"
# Slots per bucket: the eviction of "the oldest" is within a bucket, so a flood of distinct
# deliveries evicts in roughly arrival order without a global list to keep in shared memory.
WAYS = 8
# A 202 body is ~200 bytes, ~330 with the longest request id a sender may give; a reply to
# a request-response event can be kilobytes and is then not remembered.
MAX_BODY_BYTES = 560
MAX_CONTENT_TYPE_BYTES = 40
# How often a replay looks whether the delivery it waits for has been answered.
POLL_SECONDS = 0.02

_MAGIC = b"csreplay"
_VERSION = 1
_HEADER = struct.Struct("<8sIII")  # magic, version, capacity, slot size
_HEADER_BYTES = 64
# state, pid, expires (CLOCK_MONOTONIC: one clock for every process of the host), status,
# body length, digest, content type length; then the content type and the body.
_SLOT = struct.Struct("<BxxxidHH16sB")
_CONTENT_TYPE_AT = _SLOT.size
_BODY_AT = _CONTENT_TYPE_AT + MAX_CONTENT_TYPE_BYTES
SLOT_BYTES = _BODY_AT + MAX_BODY_BYTES
_DIGEST_BYTES = 16

_FREE = 0
_IN_FLIGHT = 1
_ANSWERED = 2


def create_table(path: Path, capacity: int = MAX_REMEMBERED) -> None:
    """An empty table at `path` (the parent makes it before any worker starts). The file is
    sparse: the disk and page cache hold only the slots ever used."""
    buckets = max(1, -(-capacity // WAYS))
    with path.open("wb") as file:
        file.write(_HEADER.pack(_MAGIC, _VERSION, buckets * WAYS, SLOT_BYTES))
        file.truncate(_HEADER_BYTES + buckets * WAYS * SLOT_BYTES)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ReplayTable:
    """One process's view of the shared table. Every method takes the table's lock for its
    whole look and change, and never awaits while holding it."""

    def __init__(self, path: Path, window_seconds: float) -> None:
        self._window = window_seconds
        self._fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(self._fd, 0)
            magic, version, capacity, slot_bytes = _HEADER.unpack_from(self._map, 0)
            if (magic, version, slot_bytes) != (_MAGIC, _VERSION, SLOT_BYTES):
                raise ValueError(f"{path} is not a replay table of this version")
        except BaseException:
            os.close(self._fd)
            raise
        self.capacity: int = capacity
        self._buckets = capacity // WAYS
        self._pid = os.getpid()

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _at(self, slot: int) -> int:
        return _HEADER_BYTES + slot * SLOT_BYTES

    def _read(self, slot: int) -> tuple[int, int, float, int, int, bytes, int]:
        return _SLOT.unpack_from(self._map, self._at(slot))

    def claim(self, key: bytes, now: float) -> Answer | int | None:
        """The stored answer; or the slot this process now holds the delivery's claim in (a
        claim of a process that is gone is taken over); or None while another request (of
        this process or another live one) handles it."""
        first = (int.from_bytes(key[:8], "little") % self._buckets) * WAYS
        with self._locked():
            free: int | None = None
            oldest, oldest_expires = first, float("inf")
            for slot in range(first, first + WAYS):
                state, pid, expires, status, body_len, found, ctype_len = self._read(slot)
                if state == _FREE or expires <= now:
                    free = slot if free is None else free
                    continue
                if found == key:
                    if state == _ANSWERED:
                        return self._answer(slot, status, ctype_len, body_len)
                    if alive(pid):
                        return None
                    # Its process is gone: the claim is void, and this slot is the new one.
                    free = slot
                    break
                if expires < oldest_expires:
                    oldest, oldest_expires = slot, expires
            victim = oldest if free is None else free
            _SLOT.pack_into(
                self._map, self._at(victim), _IN_FLIGHT, self._pid, now + self._window, 0, 0, key, 0
            )
            return victim

    def _answer(self, slot: int, status: int, ctype_len: int, body_len: int) -> Answer:
        at = self._at(slot)
        content_type = self._map[at + _CONTENT_TYPE_AT : at + _CONTENT_TYPE_AT + ctype_len]
        body = self._map[at + _BODY_AT : at + _BODY_AT + body_len]
        return Answer(status, body, content_type.decode("ascii"))

    def _mine(self, slot: int, key: bytes) -> bool:
        state, pid, _, _, _, found, _ = self._read(slot)
        return state == _IN_FLIGHT and pid == self._pid and found == key

    def complete(self, slot: int, key: bytes, answer: Answer) -> None:
        """Keeps the answer of a delivery this process claimed, unless it is too long or its
        slot was given to another delivery meanwhile."""
        content_type = answer.content_type.encode("ascii", "replace")
        if len(answer.body) > MAX_BODY_BYTES or len(content_type) > MAX_CONTENT_TYPE_BYTES:
            self.drop(slot, key)
            return
        at = self._at(slot)
        with self._locked():
            if not self._mine(slot, key):
                return
            _, _, expires, _, _, _, _ = self._read(slot)
            self._map[at + _CONTENT_TYPE_AT : at + _CONTENT_TYPE_AT + len(content_type)] = (
                content_type
            )
            self._map[at + _BODY_AT : at + _BODY_AT + len(answer.body)] = answer.body
            # The state byte last, on its own: pack_into writes the state first, so a crash
            # mid-pack would leave "answered" over a half-written answer (readers hold the
            # lock anyway; this keeps a killed worker's slot harmless too).
            _SLOT.pack_into(
                self._map,
                at,
                _IN_FLIGHT,
                self._pid,
                expires,
                answer.status,
                len(answer.body),
                key,
                len(content_type),
            )
            self._map[at] = _ANSWERED

    def drop(self, slot: int, key: bytes) -> None:
        """Forgets a claim of this process: the delivery was not accepted."""
        with self._locked():
            if self._mine(slot, key):
                self._map[self._at(slot)] = _FREE

    def sweep(self, now: float, chunk: int = 4096) -> int:
        """Frees expired slots and those claimed by processes that are gone, a chunk of slots
        per lock, so no request waits long behind it; returns how many are in use."""
        used = 0
        for start in range(0, self.capacity, chunk):
            with self._locked():
                for slot in range(start, min(start + chunk, self.capacity)):
                    at = self._at(slot)
                    if self._map[at] == _FREE:
                        continue
                    state, pid, expires, _, _, _, _ = self._read(slot)
                    if expires <= now or (state == _IN_FLIGHT and not alive(pid)):
                        self._map[at] = _FREE
                    else:
                        used += 1
        return used


class SharedDeliveries:
    """ingress/replays.py's RecentDeliveries, for every worker of one ingress at once."""

    def __init__(
        self,
        path: Path,
        window_seconds: float,
        wait_seconds: float,
        sweep_interval: float = SWEEP_INTERVAL_SECONDS,
    ) -> None:
        self._table = ReplayTable(path, window_seconds)
        self._wait = wait_seconds
        self._sweep_interval = sweep_interval

    def __len__(self) -> int:
        return self._table.sweep(time.monotonic())

    def close(self) -> None:
        self._table.close()

    async def sweeper(self, app: web.Application) -> AsyncGenerator[None, None]:
        """A cleanup context: frees expired slots on a timer; unmaps the table at the end."""
        try:
            async with sweeping(self._sweep_interval, self._table.sweep, "shared-deliveries"):
                yield
        finally:
            self.close()

    async def answer(
        self, key: str, handle: Callable[[], Awaitable[web.Response]]
    ) -> tuple[web.Response, bool]:
        """The response for this delivery, and whether it is a replay of an earlier one."""
        hashed = hashlib.blake2b(key.encode(), digest_size=_DIGEST_BYTES).digest()
        deadline = time.monotonic() + self._wait
        while True:
            now = time.monotonic()
            found = self._table.claim(hashed, now)
            if isinstance(found, Answer):
                return found.response(), True
            if isinstance(found, int):
                break
            if now >= deadline:
                # The first is taking longer than any request may: handled on its own, at
                # worst a duplicate (which consumers absorb), never a loss.
                return await handle(), False
            await asyncio.sleep(POLL_SECONDS)
        return await first_delivery(
            handle,
            lambda kept: self._table.complete(found, hashed, kept),
            lambda: self._table.drop(found, hashed),
        )
