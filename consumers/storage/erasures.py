"""The erasure log: its schema, how erasures are recorded, and the rule that an erasure
outlives the copies still on Kafka.

`callstream erase` deletes a person's reports, and the status updates of their calls
(`call_events`), from storage and records the erasure in an
`erasures` table in the same database, with its selectors as SHA-256 (`ErasureLog`: an
entry before anything is deleted, completed afterwards). Copies of those
reports can still arrive afterwards: a replay of the topic, a late redelivery, a dead-letter
re-drive. The storage consumer therefore checks every batch against the log inside its
write transaction and does not store a report or status update an erasure covers.

The check cannot miss an erasure that runs at the same moment as a write:

* SQLite: the write transaction is BEGIN IMMEDIATE, so it reads the log while holding the
  write lock. An erasure's log entry is either committed before it (the write sees it) or
  waits for it (and the erasure's DELETE, which comes after its entry, removes the row).
* PostgreSQL: each write holds a shared advisory lock (``WRITE_FENCE_KEY``) for its
  transaction; an erasure holds the exclusive one from before its log entry until its
  DELETE committed. A write either finishes before the erasure starts (and the DELETE
  removes its rows) or starts after it (and sees the entry).

Retention purges (`callstream purge`) are not applied to arriving reports: retention is
rolling, and the next scheduled purge removes an old report that came back.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, Literal, TypeVar

from consumers.errors import PermanentError, RetryableError
from consumers.storage.connections import Connection, PostgresConnection, SqliteConnection
from consumers.storage.dialects import Dialect
from consumers.storage.settings import BackendName, StorageSettings
from consumers.storage.statements import Script, one

log = logging.getLogger(__name__)
_T = TypeVar("_T")

ErasureKind = Literal["phone", "call", "phone+call", "retention"]

SQLITE_DDL: Final = """
CREATE TABLE IF NOT EXISTS erasures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    requested_at TEXT NOT NULL,
    completed_at TEXT,
    kind TEXT NOT NULL CHECK (kind IN ('phone', 'call', 'phone+call', 'retention')),
    phone_sha256 TEXT,
    call_id_sha256 TEXT,
    older_than_seconds INTEGER,
    rows_deleted INTEGER
)
"""
POSTGRES_DDL: Final = """
CREATE TABLE IF NOT EXISTS erasures (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    requested_at timestamptz NOT NULL,
    completed_at timestamptz,
    kind text NOT NULL CHECK (kind IN ('phone', 'call', 'phone+call', 'retention')),
    phone_sha256 text,
    call_id_sha256 text,
    older_than_seconds bigint,
    rows_deleted bigint
)
"""
# Serialises CREATE TABLE IF NOT EXISTS between the storage consumer and `callstream erase`
# (two at once race on pg_type); not the migrations' key, and the storage consumer takes it
# outside its migration transaction, so an erasure never waits for a migration.
DDL_LOCK_KEY: Final = 0x6572617375726573  # ASCII "erasures"
# Shared by every storage write, exclusive for an erasure in progress (see above).
WRITE_FENCE_KEY: Final = 0x6572617365666E63  # ASCII "erasefnc"

# Entries this process has not seen yet, in order. Retention entries select no call.
_SINCE: Final = (
    "SELECT id, kind, phone_sha256, call_id_sha256 FROM erasures"
    " WHERE id > ? AND kind <> 'retention' ORDER BY id"
)
_DDL: Final[dict[BackendName, str]] = {"sqlite": SQLITE_DDL, "postgresql": POSTGRES_DDL}
_BEGIN: Final = (
    "INSERT INTO erasures (requested_at, kind, phone_sha256, call_id_sha256,"
    " older_than_seconds) VALUES (?, ?, ?, ?, ?)"
)
_COMPLETE: Final = "UPDATE erasures SET completed_at = ?, rows_deleted = ? WHERE id = ?"
_ENTRIES: Final = (
    "SELECT id, requested_at, completed_at, kind, phone_sha256, call_id_sha256,"
    " older_than_seconds, rows_deleted FROM erasures ORDER BY id"
)
# An operator's command waits out a busy consumer longer than the consumer waits for it.
_SQLITE_BUSY_TIMEOUT: Final = timedelta(seconds=30)


def ensure_log(dialect: Dialect) -> Script[None]:
    """The log's table. Not a storage migration: `callstream erase` creates the same table
    when it runs first, and an erasure must never wait for a long migration."""
    yield from dialect.lock(DDL_LOCK_KEY)
    yield dialect.statement(_DDL[dialect.name])


def read_log(dialect: Dialect, erased: Erased) -> Script[None]:
    """The fence, then what the log added since `erased` last looked, inside a write's
    transaction (see above for why that cannot miss an erasure)."""
    yield from dialect.lock(WRITE_FENCE_KEY, shared=True)
    since = yield dialect.statement(_SINCE, erased.last_id, returns_rows=True)
    erased.add(since.rows)


def sha256_hex(value: str) -> str:
    """A selector as the log keeps it: enough to answer "was this number erased?" for
    whoever holds the number. It is pseudonymous, not anonymous: phone numbers are few
    enough to hash them all, so the log deserves the same care as the reports."""
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(slots=True)
class Erased:
    """What the erasure log selects, loaded incrementally: erasures are only ever added."""

    # The dialect's text(): an erasure names a call as the database stores it, so a call
    # arriving later is compared in that form (PostgreSQL's U+FFFD for U+0000).
    as_stored: Callable[[str], str]
    last_id: int = 0
    phones: set[str] = field(default_factory=set)
    calls: set[str] = field(default_factory=set)
    pairs: set[tuple[str, str]] = field(default_factory=set)

    def add(self, entries: Iterable[tuple[object, ...]]) -> None:
        for entry_id, kind, phone, call in entries:
            if kind == "phone" and phone is not None:
                self.phones.add(str(phone))
            elif kind == "call" and call is not None:
                self.calls.add(str(call))
            elif kind == "phone+call" and phone is not None and call is not None:
                self.pairs.add((str(phone), str(call)))
            self.last_id = max(self.last_id, int(str(entry_id)))

    def covers_call(self, call_id: str, from_number: str | None) -> bool:
        """Whether an erasure selects the call `call_id` from `from_number`: a report, or a
        status update of its timeline (which carries the caller's number as reports do)."""
        if not (self.phones or self.calls or self.pairs):
            return False  # the usual case: nothing erased, nothing to hash
        call = sha256_hex(self.as_stored(call_id))
        if call in self.calls:
            return True
        if from_number is None:
            return False
        # Erasing by phone matches the caller's number (from_number) exactly as stored;
        # see StorageBackend.erase.
        phone = sha256_hex(self.as_stored(from_number).strip())
        return phone in self.phones or (phone, call) in self.pairs


# -- recording erasures -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Erasure:
    """One row of the erasure log."""

    id: int
    requested_at: datetime
    completed_at: datetime | None
    kind: ErasureKind
    phone_sha256: str | None
    call_id_sha256: str | None
    older_than_seconds: int | None
    rows_deleted: int | None


class ErasureLog:
    """Where erasures are recorded: the storage database itself. Each call connects, makes
    sure the table exists (`ensure_log` only: no migration) and disconnects, so the log
    holds nothing between calls and works while the storage consumer runs."""

    def __init__(self, connect: Callable[[], Connection]) -> None:
        self._connect = connect

    async def begin(
        self,
        kind: ErasureKind,
        *,
        phone_sha256: str | None = None,
        call_id_sha256: str | None = None,
        older_than_seconds: int | None = None,
    ) -> int:
        """Record that an erasure is starting; its id. Written before anything is deleted,
        so a crash midway leaves an entry without `completed_at`, never a silent deletion."""
        now = datetime.now(UTC)
        return await self._run(
            lambda d: d.insert_id(
                _BEGIN, d.time(now), kind, phone_sha256, call_id_sha256, older_than_seconds
            )
        )

    async def complete(self, entry: int, rows: int) -> None:
        now = datetime.now(UTC)
        await self._run(lambda d: one(d.statement(_COMPLETE, d.time(now), rows, entry)))

    def fenced(self) -> contextlib.AbstractAsyncContextManager[None]:
        """The exclusive side of the write fence (see above): held from before the log entry
        until the rows are deleted, so that no storage write can slip a covered report in
        between."""
        return self._connect().lock(WRITE_FENCE_KEY)

    async def entries(self) -> list[Erasure]:
        return await self._run(_entries, transaction=False)

    async def compact(self) -> bool:
        """Dialect.compact; False too if the database refused, which leaves the deletion
        itself intact."""
        try:
            return await self._run(lambda d: d.compact(), transaction=False)
        except (RetryableError, PermanentError) as exc:
            log.warning("could not compact the storage database now (%s); run again", exc)
            return False

    async def _run(
        self, script: Callable[[Dialect], Script[_T]], *, transaction: bool = True
    ) -> _T:
        connection = self._connect()
        try:
            return await connection.run(script(connection.dialect), transaction=transaction)
        finally:
            await connection.close()


def _entries(dialect: Dialect) -> Script[list[Erasure]]:
    rows = (yield dialect.statement(_ENTRIES, returns_rows=True)).rows
    read = dialect.read_time
    # The columns in Erasure's order; only the times differ between the databases.
    return [
        Erasure(entry, read(requested), None if completed is None else read(completed), *rest)
        for entry, requested, completed, *rest in rows
    ]


def _log_only(dialect: Dialect) -> tuple[Script[None]]:
    return (ensure_log(dialect),)


def erasure_log(settings: StorageSettings) -> ErasureLog:
    """The log in the database `settings` name. No command timeout on PostgreSQL: a
    VACUUM of a large table takes as long as it takes."""
    if settings.database_url is not None:
        dsn = settings.database_url.reveal()
        return ErasureLog(lambda: PostgresConnection(dsn, _log_only, command_timeout=None))
    path = settings.sqlite_path
    return ErasureLog(lambda: SqliteConnection(path, _log_only, busy_timeout=_SQLITE_BUSY_TIMEOUT))
