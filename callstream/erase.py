"""Erasure and retention of stored reports: `callstream erase` and `callstream purge`.

The rows go through the storage backend's own `erase` / `purge_older_than`, so one place
decides what a selector matches. Every run is recorded in an `erasures` table in the same
database: when it was asked for and finished, the selector as SHA-256 (never the number or
the call id itself) and how many rows went.

The log is its own table, created here with CREATE TABLE IF NOT EXISTS, rather than a
storage migration: writing to it needs a connection of its own anyway (the backends expose
no statement API), a migration would only exist once a storage consumer of this release has
run, and migration numbers are shared with other work on the storage schema.

After deleting, the database is compacted (SQLite: VACUUM and a WAL checkpoint, so the
erased bytes are gone from the file and not merely unlinked; PostgreSQL: VACUUM, which makes
the dead rows' space reusable). See docs/privacy.md for what this does not reach: the Kafka
topic, backups, and copies already sent out by alerting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Literal

import asyncpg

from consumers import sqlite_file
from consumers.storage import (
    DDL_LOCK_KEY,
    POSTGRES_DDL,
    SQLITE_DDL,
    WRITE_FENCE_KEY,
    StorageSettings,
    open_backend,
    sha256_hex,
)
from core.logs import mask_phone

log = logging.getLogger(__name__)

Kind = Literal["phone", "call", "phone+call", "retention"]

_SELECT_LOG: Final = (
    "SELECT id, requested_at, completed_at, kind, phone_sha256, call_id_sha256,"
    " older_than_seconds, rows_deleted FROM erasures ORDER BY id"
)
_SQLITE_BUSY_TIMEOUT: Final = 30.0
_AGE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `3600s`, `2w` -> a positive timedelta."""
    match = _AGE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not an age such as 30d, 12h, 90m, 3600s or 2w")
    age = timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
    if age <= timedelta(0):
        raise ValueError("the age must be more than zero (zero would delete everything)")
    return age


@dataclass(frozen=True, slots=True)
class Erasure:
    """One row of the erasure log."""

    id: int
    requested_at: datetime
    completed_at: datetime | None
    kind: Kind
    phone_sha256: str | None
    call_id_sha256: str | None
    older_than_seconds: int | None
    rows_deleted: int | None


@dataclass(frozen=True, slots=True)
class Outcome:
    entry: int  # id in the erasure log
    rows: int
    compacted: bool  # False: deleted and logged, but the space is not compacted yet


# -- the log ------------------------------------------------------------------------------


class ErasureLog(ABC):
    """Where erasures are recorded: the storage database itself."""

    @abstractmethod
    async def begin(
        self,
        kind: Kind,
        *,
        phone_sha256: str | None = None,
        call_id_sha256: str | None = None,
        older_than_seconds: int | None = None,
    ) -> int:
        """Record that an erasure is starting; its id. Written before anything is deleted,
        so a crash midway leaves an entry without `completed_at`, never a silent deletion."""

    @abstractmethod
    async def complete(self, entry: int, rows: int) -> None: ...

    def fenced(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Held from before the log entry until the rows are deleted, so that no storage
        write can slip a covered report in between (see consumers.storage.erasures)."""
        return contextlib.nullcontext()

    @abstractmethod
    async def entries(self) -> list[Erasure]: ...

    @abstractmethod
    async def compact(self) -> bool:
        """Make deleted rows' bytes go away (or at least become reusable); False if it could
        not finish now (a busy database), which leaves the deletion itself intact."""


class SqliteErasureLog(ErasureLog):
    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite_file.connect(self.path, busy_timeout=_SQLITE_BUSY_TIMEOUT)
        try:
            conn.execute(SQLITE_DDL)
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self, sql: str, params: tuple[object, ...]) -> int:
        conn = self._connect()
        try:
            cursor = conn.execute(sql, params)
            return int(cursor.lastrowid or 0)
        finally:
            conn.close()

    async def begin(
        self,
        kind: Kind,
        *,
        phone_sha256: str | None = None,
        call_id_sha256: str | None = None,
        older_than_seconds: int | None = None,
    ) -> int:
        sql = (
            "INSERT INTO erasures (requested_at, kind, phone_sha256, call_id_sha256,"
            " older_than_seconds) VALUES (?, ?, ?, ?, ?)"
        )
        params = (_now_iso(), kind, phone_sha256, call_id_sha256, older_than_seconds)
        return await asyncio.to_thread(self._run, sql, params)

    async def complete(self, entry: int, rows: int) -> None:
        sql = "UPDATE erasures SET completed_at = ?, rows_deleted = ? WHERE id = ?"
        await asyncio.to_thread(self._run, sql, (_now_iso(), rows, entry))

    async def entries(self) -> list[Erasure]:
        def read() -> list[Erasure]:
            conn = self._connect()
            try:
                rows = conn.execute(_SELECT_LOG).fetchall()
            finally:
                conn.close()
            return [_entry(row, _from_iso) for row in rows]

        return await asyncio.to_thread(read)

    async def compact(self) -> bool:
        def vacuum() -> bool:
            conn = self._connect()
            try:
                # VACUUM rewrites the file without the freed pages; the checkpoint then moves
                # the rewrite out of the WAL and truncates it, so no old page image survives
                # in either file.
                conn.execute("VACUUM")
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                return not busy
            except sqlite3.OperationalError as exc:
                log.warning("could not compact %s now (%s); run the command again", self.path, exc)
                return False
            finally:
                conn.close()

        return await asyncio.to_thread(vacuum)


class PostgresErasureLog(ErasureLog):
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn

    @contextlib.asynccontextmanager
    async def fenced(self) -> AsyncIterator[None]:
        # A session lock on a connection of its own: the entry and the DELETE commit on
        # other connections while it is held, and closing the connection releases it.
        # Keepalives: if this host vanishes, the server drops the lock (and the storage
        # writes waiting on it go on) within half a minute, not after hours.
        conn = await self._connect(
            server_settings={
                "tcp_keepalives_idle": "10",
                "tcp_keepalives_interval": "5",
                "tcp_keepalives_count": "3",
            }
        )
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", WRITE_FENCE_KEY)
            yield
        finally:
            await conn.close()

    async def _connect(
        self, server_settings: dict[str, str] | None = None
    ) -> asyncpg.Connection[asyncpg.Record]:
        conn: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(
            self._dsn, timeout=10, server_settings=server_settings
        )
        try:
            async with conn.transaction():
                # Two erasures starting at once would otherwise race on CREATE TABLE IF NOT
                # EXISTS (a unique violation in pg_type).
                await conn.execute("SELECT pg_advisory_xact_lock($1)", DDL_LOCK_KEY)
                await conn.execute(POSTGRES_DDL)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def begin(
        self,
        kind: Kind,
        *,
        phone_sha256: str | None = None,
        call_id_sha256: str | None = None,
        older_than_seconds: int | None = None,
    ) -> int:
        conn = await self._connect()
        try:
            entry = await conn.fetchval(
                "INSERT INTO erasures (requested_at, kind, phone_sha256, call_id_sha256,"
                " older_than_seconds) VALUES ($1, $2, $3, $4, $5) RETURNING id",
                datetime.now(UTC),
                kind,
                phone_sha256,
                call_id_sha256,
                older_than_seconds,
            )
            return int(entry)
        finally:
            await conn.close()

    async def complete(self, entry: int, rows: int) -> None:
        conn = await self._connect()
        try:
            await conn.execute(
                "UPDATE erasures SET completed_at = $1, rows_deleted = $2 WHERE id = $3",
                datetime.now(UTC),
                rows,
                entry,
            )
        finally:
            await conn.close()

    async def entries(self) -> list[Erasure]:
        conn = await self._connect()
        try:
            rows = await conn.fetch(_SELECT_LOG)
        finally:
            await conn.close()
        return [_entry(tuple(row), _same) for row in rows]

    async def compact(self) -> bool:
        conn = await self._connect()
        try:
            # Plain VACUUM: the dead rows' space becomes reusable without the exclusive lock
            # VACUUM FULL would hold against the storage consumer.
            await conn.execute("VACUUM call_reports")
            return True
        except asyncpg.PostgresError as exc:
            log.warning("could not VACUUM call_reports (%s)", type(exc).__name__)
            return False
        finally:
            await conn.close()


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _from_iso(value: object) -> datetime:
    return datetime.fromisoformat(str(value))


def _same(value: object) -> datetime:
    assert isinstance(value, datetime)
    return value


def _entry(row: tuple[object, ...], convert: Callable[[object], datetime]) -> Erasure:
    (entry, requested, completed, kind, phone, call, older, rows) = row
    return Erasure(
        id=int(str(entry)),
        requested_at=convert(requested),
        completed_at=None if completed is None else convert(completed),
        kind=kind,  # type: ignore[arg-type]  # the CHECK constraint keeps it a Kind
        phone_sha256=None if phone is None else str(phone),
        call_id_sha256=None if call is None else str(call),
        older_than_seconds=None if older is None else int(str(older)),
        rows_deleted=None if rows is None else int(str(rows)),
    )


def erasure_log(settings: StorageSettings) -> ErasureLog:
    if settings.database_url is not None:
        return PostgresErasureLog(settings.database_url.reveal())
    return SqliteErasureLog(settings.sqlite_path)


# -- the two operations ---------------------------------------------------------------------


async def erase(
    settings: StorageSettings, *, phone: str | None = None, call_id: str | None = None
) -> Outcome:
    """Delete the calls from `phone` and/or with `call_id` (both: calls matching both),
    recording the erasure; the backend decides what matches (see StorageBackend.erase)."""
    phone = _selector(phone, "--phone")
    call_id = _selector(call_id, "--call")
    if phone is None and call_id is None:
        raise ValueError("say whose reports to erase: --phone NUMBER, --call ID, or both")
    kind: Kind = "phone+call" if phone and call_id else "phone" if phone else "call"
    backend = open_backend(settings)
    async with backend:
        erasures = erasure_log(settings)
        async with erasures.fenced():
            entry = await erasures.begin(
                kind,
                phone_sha256=None if phone is None else sha256_hex(phone),
                call_id_sha256=None if call_id is None else sha256_hex(call_id),
            )
            rows = await backend.erase(phone, call_id)
        await erasures.complete(entry, rows)
        compacted = await erasures.compact()
    log.info(
        "erased %d report(s) by %s (phone %s), erasure #%d",
        rows,
        kind,
        mask_phone(phone) if phone else "-",
        entry,
    )
    return Outcome(entry, rows, compacted)


async def purge(settings: StorageSettings, older_than: timedelta) -> Outcome:
    """Delete the calls whose event time is more than `older_than` ago, recording it."""
    backend = open_backend(settings)
    async with backend:
        erasures = erasure_log(settings)
        entry = await erasures.begin(
            "retention", older_than_seconds=int(older_than.total_seconds())
        )
        rows = await backend.purge_older_than(older_than)
        await erasures.complete(entry, rows)
        compacted = await erasures.compact() if rows else True
    log.info("purged %d report(s) older than %s, erasure #%d", rows, older_than, entry)
    return Outcome(entry, rows, compacted)


def _selector(value: str | None, option: str) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value:
        raise ValueError(f"{option} must not be empty")
    return value
