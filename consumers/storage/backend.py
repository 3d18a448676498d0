"""The storage consumer's two SQL backends: SQLite (default, no server) and PostgreSQL.

Both keep one row per call in `call_reports`, the newest version of its report by
(event_time, received_at), with the record exactly as it sat on the topic in `record`.
The typed columns are a queryable copy; `record` is the truth that replays re-publish.

Errors leave here already sorted for the runner: the database being unreachable, busy or
out of resources is `RetryableError`; content it refuses is `PermanentError`.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import asyncpg
import orjson

from consumers import sqlite_file
from consumers.contract import Delivery
from consumers.errors import PermanentError, RetryableError
from consumers.sqlite_file import SqliteThread
from consumers.storage import erasures
from consumers.storage.settings import BackendName
from schemas.report import CallReport

log = logging.getLogger(__name__)

JsonValue = Any
_T = TypeVar("_T")

# Rows per page for iter_records: large enough to stream fast, small enough that no
# connection or transaction stays open while the caller works through a page.
_PAGE_SIZE: Final = 1000

# Column order of the row tuples both backends bind. `stored_at` comes last, per batch.
COLUMNS: Final = (
    "call_id",
    "event_type",
    "event_time",
    "received_at",
    "call_type",
    "call_status",
    "ended_reason",
    "from_number",
    "to_number",
    "assistant_name",
    "duration_seconds",
    "transcript",
    "summary",
    "recording_url",
    "analysis_summary",
    "success_evaluation",
    "structured_data",
    "user_metadata",
    "extra",
    "source_format",
    "request_id",
    "record",
    "kafka_partition",
    "kafka_offset",
    "stored_at",
)
_COLUMN_LIST: Final = ", ".join(COLUMNS)
_JSON_COLUMNS: Final = frozenset(
    {"success_evaluation", "structured_data", "user_metadata", "extra"}
)
_TIME_COLUMNS: Final = frozenset({"event_time", "received_at", "stored_at"})


@dataclass(frozen=True, slots=True)
class StoredReport:
    """One row of `call_reports`, its columns read back as Python values."""

    call_id: str
    event_type: str
    event_time: datetime
    received_at: datetime
    call_type: str | None
    call_status: str | None
    ended_reason: str | None
    from_number: str | None
    to_number: str | None
    assistant_name: str | None
    duration_seconds: float | None
    transcript: str | None
    summary: str | None
    recording_url: str | None
    analysis_summary: str | None
    success_evaluation: bool | int | float | str | None
    structured_data: dict[str, Any] | None
    user_metadata: dict[str, Any] | None
    extra: dict[str, Any] | None
    source_format: str
    request_id: str
    record: bytes
    kafka_partition: int
    kafka_offset: int
    stored_at: datetime


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


def _check_migrations(migrations: tuple[Migration, ...]) -> tuple[Migration, ...]:
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(migrations) + 1)):
        raise AssertionError(f"migrations must be numbered 1..n in order, got {versions}")
    return migrations


# Append only: a released migration is never edited, because databases that already
# applied it would silently differ from new ones.
SQLITE_MIGRATIONS: Final = _check_migrations(
    (
        Migration(
            1,
            "call_reports with event_time and from_number indexes",
            (
                # Times are ISO-8601 UTC text of one fixed width, so text order is time
                # order and the upsert's newer-than comparison works on them directly.
                """
                CREATE TABLE call_reports (
                    call_id TEXT NOT NULL PRIMARY KEY,
                    event_type TEXT NOT NULL,
                    event_time TEXT NOT NULL,
                    received_at TEXT NOT NULL,
                    call_type TEXT,
                    call_status TEXT,
                    ended_reason TEXT,
                    from_number TEXT,
                    to_number TEXT,
                    assistant_name TEXT,
                    duration_seconds REAL,
                    transcript TEXT,
                    summary TEXT,
                    recording_url TEXT,
                    analysis_summary TEXT,
                    success_evaluation TEXT,
                    structured_data TEXT,
                    user_metadata TEXT,
                    extra TEXT,
                    source_format TEXT NOT NULL,
                    request_id TEXT NOT NULL,
                    record BLOB NOT NULL,
                    kafka_partition INTEGER NOT NULL,
                    kafka_offset INTEGER NOT NULL,
                    stored_at TEXT NOT NULL
                )
                """,
                # call_id rides along so iter_records pages by (event_time, call_id) on
                # the index alone.
                "CREATE INDEX call_reports_event_time_idx ON call_reports (event_time, call_id)",
                "CREATE INDEX call_reports_from_number_idx ON call_reports (from_number)"
                " WHERE from_number IS NOT NULL",
            ),
        ),
    )
)

POSTGRES_MIGRATIONS: Final = _check_migrations(
    (
        Migration(
            1,
            "call_reports with event_time and from_number indexes",
            (
                # call_id in the C collation: ids are opaque, so byte order is all that
                # is wanted, and it is far cheaper than a linguistic collation for the
                # primary key that every upsert probes.
                # toast_tuple_target: a typical report (~4 kB with its record) stays in
                # the row as it is instead of being compressed and moved to the TOAST
                # table; that halved the server's CPU per upsert in measurements. Two
                # such rows still fill an 8 kB page; longer ones are compressed as usual.
                """
                CREATE TABLE call_reports (
                    call_id text COLLATE "C" PRIMARY KEY,
                    event_type text NOT NULL,
                    event_time timestamptz NOT NULL,
                    received_at timestamptz NOT NULL,
                    call_type text,
                    call_status text,
                    ended_reason text,
                    from_number text,
                    to_number text,
                    assistant_name text,
                    duration_seconds double precision,
                    transcript text,
                    summary text,
                    recording_url text,
                    analysis_summary text,
                    success_evaluation jsonb,
                    structured_data jsonb,
                    user_metadata jsonb,
                    extra jsonb,
                    source_format text NOT NULL,
                    request_id text NOT NULL,
                    record bytea NOT NULL,
                    kafka_partition integer NOT NULL,
                    kafka_offset bigint NOT NULL,
                    stored_at timestamptz NOT NULL
                ) WITH (toast_tuple_target = 4080)
                """,
                # lz4 compresses the long values several times faster than the default
                # pglz. Servers built without it (or older than 14) keep pglz.
                """
                DO $$
                BEGIN
                    IF EXISTS (
                        SELECT FROM pg_settings
                        WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)
                    ) THEN
                        ALTER TABLE call_reports
                            ALTER COLUMN transcript SET COMPRESSION lz4,
                            ALTER COLUMN summary SET COMPRESSION lz4,
                            ALTER COLUMN analysis_summary SET COMPRESSION lz4,
                            ALTER COLUMN structured_data SET COMPRESSION lz4,
                            ALTER COLUMN user_metadata SET COMPRESSION lz4,
                            ALTER COLUMN extra SET COMPRESSION lz4,
                            ALTER COLUMN record SET COMPRESSION lz4;
                    END IF;
                END
                $$
                """,
                "CREATE INDEX call_reports_event_time_idx ON call_reports (event_time, call_id)",
                # Hash, not btree: erasure only ever asks for equality, and a btree entry
                # is capped near 2.7 kB, so one absurdly long caller number would make
                # its report unstorable.
                "CREATE INDEX call_reports_from_number_idx ON call_reports"
                " USING hash (from_number)",
            ),
        ),
    )
)


# -- turning deliveries into rows ---------------------------------------------------------


def _version(report: CallReport) -> tuple[datetime, datetime]:
    """Which of two reports of one call is newer: later event, then later receipt."""
    return report.event_time, report.received_at


def _newest_per_call(batch: Iterable[Delivery], key: Callable[[str], str]) -> list[Delivery]:
    """The newest delivery of each call in `batch`, sorted by call id.

    PostgreSQL's ON CONFLICT refuses to touch one row twice in a statement, so versions
    are settled here first; on a tie the first seen wins, as the stored row does. The
    sort gives every instance the same lock order, which keeps concurrent upserts of
    overlapping batches from deadlocking.
    """
    newest: dict[str, Delivery] = {}
    for delivery in batch:
        call = key(delivery.report.call_id)
        held = newest.get(call)
        if held is None or _version(delivery.report) > _version(held.report):
            newest[call] = delivery
    return [newest[call] for call in sorted(newest)]


def _keep(text: str) -> str:
    return text


def _without_nul(text: str) -> str:
    # PostgreSQL's text and jsonb cannot hold U+0000 at all. Only these column copies
    # change (to U+FFFD, the usual stand-in for an unrepresentable character); the
    # `record` column keeps the report byte for byte, so nothing is lost.
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _optional(value: str | None, text: Callable[[str], str]) -> str | None:
    return None if value is None else text(value)


def _json_without_nul(value: JsonValue) -> JsonValue:
    if isinstance(value, str):
        return _without_nul(value)
    if isinstance(value, dict):
        return {_without_nul(k): _json_without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_without_nul(v) for v in value]
    return value


def _json(value: JsonValue, *, sanitise: bool) -> str | None:
    # None is SQL NULL (the report has no such field), never JSON null. A NaN or infinite
    # success_evaluation (possible in Avro, impossible in the JSON webhooks) becomes JSON
    # null here because JSON has no spelling for it; `record` keeps the real value.
    if value is None:
        return None
    text = orjson.dumps(value).decode()
    if sanitise and "\\u0000" in text:
        text = orjson.dumps(_json_without_nul(value)).decode()
    return text


def _duration(value: int | float | None) -> float | None:
    return None if value is None else float(value)


def _iso_utc(moment: datetime) -> str:
    """Fixed-width ISO-8601 UTC with microseconds, so text order is time order."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: every time in callstream is UTC-aware")
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _from_iso(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _aware(moment: datetime, what: str) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"{what} must be timezone-aware")
    return moment


def _window_end(until: datetime | None) -> datetime:
    return datetime.max.replace(tzinfo=UTC) if until is None else _aware(until, "until")


def _cutoff(age: timedelta) -> datetime:
    if age <= timedelta(0):
        # A zero or negative age would delete every call, which is never what retention means.
        raise ValueError(f"retention age must be positive, not {age}")
    return datetime.now(UTC) - age


def _report_row(
    delivery: Delivery,
    time: Callable[[datetime], Any],
    text: Callable[[str], str],
    *,
    sanitise: bool,
) -> tuple[Any, ...]:
    """The row for one delivery, in COLUMNS order without `stored_at`."""
    report = delivery.report
    return (
        text(report.call_id),
        text(report.event_type),
        time(report.event_time),
        time(report.received_at),
        _optional(report.call_type, text),
        _optional(report.call_status, text),
        _optional(report.ended_reason, text),
        _optional(report.from_number, text),
        _optional(report.to_number, text),
        _optional(report.assistant_name, text),
        _duration(report.duration_seconds),
        _optional(report.transcript, text),
        _optional(report.summary, text),
        _optional(report.recording_url, text),
        _optional(report.analysis_summary, text),
        _json(report.success_evaluation, sanitise=sanitise),
        _json(report.structured_data, sanitise=sanitise),
        _json(report.user_metadata, sanitise=sanitise),
        _json(report.extra, sanitise=sanitise),
        text(report.source_format),
        text(report.request_id),
        delivery.value,
        delivery.partition,
        delivery.offset,
    )


def _rows(
    batch: Sequence[Delivery],
    time: Callable[[datetime], Any],
    text: Callable[[str], str],
    *,
    sanitise: bool,
) -> list[tuple[Any, ...]]:
    try:
        return [
            _report_row(d, time, text, sanitise=sanitise) for d in _newest_per_call(batch, text)
        ]
    except (TypeError, ValueError) as exc:
        # orjson refuses what JSON cannot hold (integers beyond 64 bits, lone surrogates).
        raise PermanentError(f"report cannot be stored: {type(exc).__name__}: {exc}") from exc


def _loads(text: str | None) -> JsonValue:
    return None if text is None else orjson.loads(text)


def _stored(row: Sequence[Any], time: Callable[[Any], datetime]) -> StoredReport:
    values = dict(zip(COLUMNS, row, strict=True))
    for name in _TIME_COLUMNS:
        values[name] = time(values[name])
    for name in _JSON_COLUMNS:
        values[name] = _loads(values[name])
    values["record"] = bytes(values["record"])
    return StoredReport(**values)


def _erase_statement(
    phone: str | None, call_id: str | None, statements: Mapping[str, str]
) -> tuple[str, list[str]]:
    # The caller's number is from_number in every format (FLAT fromCaller, nested
    # customer.number); to_number is the assistant's line, shared by every caller, so
    # matching it would erase other people's calls. Both given: rows matching both, the
    # narrower reading of an erasure request.
    if phone is not None and call_id is not None:
        return statements["both"], [phone, call_id]
    if phone is not None:
        return statements["phone"], [phone]
    if call_id is not None:
        return statements["call_id"], [call_id]
    raise ValueError("erase needs a phone number, a call id, or both")


@dataclass(frozen=True, slots=True)
class Written:
    """What one `write` did with its batch."""

    rows: int  # inserted or changed
    erased: int  # not stored: an erasure covers them (consumers.storage.erasures)


# -- the interface ------------------------------------------------------------------------


class StorageBackend(ABC):
    """Where reports are kept. `open` connects and migrates; every other method opens
    on demand, so a database that was down at start-up is picked up once it is back."""

    name: BackendName

    @abstractmethod
    async def open(self) -> None:
        """Connect and apply pending migrations; RetryableError while that cannot happen."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def write(self, batch: Sequence[Delivery], stored_at: datetime) -> Written:
        """Upsert the newest version of each call in one transaction, leaving out the
        calls an erasure covers. Reports that were already stored, or older than the
        stored version, change nothing and count in neither figure."""

    @abstractmethod
    async def fetch(self, call_id: str) -> StoredReport | None: ...

    @abstractmethod
    async def count(self) -> int: ...

    @abstractmethod
    async def erase(self, phone: str | None, call_id: str | None) -> int:
        """Delete the calls from `phone` and/or with `call_id`; how many rows went."""

    @abstractmethod
    async def purge_older_than(self, age: timedelta) -> int:
        """Delete calls whose event_time is more than `age` ago; how many rows went."""

    @abstractmethod
    def iter_records(
        self, since: datetime, until: datetime | None = None
    ) -> AsyncIterator[tuple[str, bytes]]:
        """(call_id, record) with since <= event_time < until, oldest first, page by page."""

    @abstractmethod
    async def applied_migrations(self) -> list[int]: ...

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# -- SQLite -------------------------------------------------------------------------------

# Failures of the file, the disk or a concurrent writer: the same batch can succeed later.
_SQLITE_RETRYABLE: Final = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_INTERRUPT,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOTADB,
    }
)


def classify_sqlite(exc: Exception) -> RetryableError | PermanentError:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(exc, OSError) or (code is not None and code & 0xFF in _SQLITE_RETRYABLE):
        return RetryableError(f"SQLite unavailable: {type(exc).__name__}: {exc}")
    # Everything else is about the rows (constraint, too big, a string with lone
    # surrogates that cannot be UTF-8): retrying the same content cannot help.
    return PermanentError(f"SQLite refused the batch: {type(exc).__name__}: {exc}")


# Column lists are spelled out from COLUMNS, a constant, never from input.
_SQLITE_UPSERT: Final = (
    f"INSERT INTO call_reports ({_COLUMN_LIST})"  # noqa: S608
    f" VALUES ({', '.join('?' * len(COLUMNS))})"
    " ON CONFLICT (call_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c != "call_id")
    + " WHERE (excluded.event_time, excluded.received_at)"
    " > (call_reports.event_time, call_reports.received_at)"
)
_SQLITE_FETCH: Final = f"SELECT {_COLUMN_LIST} FROM call_reports WHERE call_id = ?"  # noqa: S608
_SQLITE_ERASE: Final = {
    "phone": "DELETE FROM call_reports WHERE from_number = ?",
    "call_id": "DELETE FROM call_reports WHERE call_id = ?",
    "both": "DELETE FROM call_reports WHERE from_number = ? AND call_id = ?",
}
# Keyset pages: the first includes `since` itself, later ones start after the last row.
_SQLITE_FIRST_PAGE: Final = (
    "SELECT event_time, call_id, record FROM call_reports"
    " WHERE (event_time, call_id) >= (?, ?) AND event_time < ?"
    " ORDER BY event_time, call_id LIMIT ?"
)
_SQLITE_NEXT_PAGE: Final = _SQLITE_FIRST_PAGE.replace(">=", ">")


class SqliteBackend(StorageBackend):
    """One file, opened and used the way consumers.sqlite_file describes."""

    name: BackendName = "sqlite"

    def __init__(self, path: Path, *, busy_timeout: timedelta = timedelta(seconds=5)) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout.total_seconds()
        self._db = SqliteThread("callstream-sqlite", self._connect, classify_sqlite)
        self._erased = erasures.Erased()

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        return await self._db.run(fn)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite_file.connect(self.path, busy_timeout=self._busy_timeout)
        try:
            # Checkpoint the WAL into the database every 32 MB instead of every 4 MB: a
            # batch of 500 reports writes ~2 MB, so the default checkpointed (and fsync'd
            # the database file) inside every second COMMIT.
            conn.execute("PRAGMA wal_autocheckpoint = 8192")
            _migrate_sqlite(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    async def write(self, batch: Sequence[Delivery], stored_at: datetime) -> Written:
        stamp = _iso_utc(stored_at)
        if not batch:
            return Written(0, 0)

        def upsert(conn: sqlite3.Connection) -> Written:
            # The log is read under the write lock BEGIN IMMEDIATE holds: an erasure
            # cannot commit between this check and the upsert.
            with sqlite_file.transaction(conn):
                since = (self._erased.last_id,)
                self._erased.add(conn.execute(erasures.SQLITE_SINCE, since).fetchall())
                kept = [d for d in batch if not self._erased.covers(d.report)]
                rows = [(*row, stamp) for row in _rows(kept, _iso_utc, _keep, sanitise=False)]
                written = conn.executemany(_SQLITE_UPSERT, rows).rowcount if rows else 0
                return Written(written, len(batch) - len(kept))

        try:
            return await self._run(upsert)
        except UnicodeEncodeError as exc:
            raise PermanentError(f"SQLite refused the batch: {exc.reason}") from exc

    async def fetch(self, call_id: str) -> StoredReport | None:
        def select(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = conn.execute(_SQLITE_FETCH, (call_id,)).fetchone()
            return row

        row = await self._run(select)
        return None if row is None else _stored(row, _from_iso)

    async def count(self) -> int:
        return await self._run(
            lambda conn: int(conn.execute("SELECT count(*) FROM call_reports").fetchone()[0])
        )

    async def erase(self, phone: str | None, call_id: str | None) -> int:
        return await self._delete(*_erase_statement(phone, call_id, _SQLITE_ERASE))

    async def purge_older_than(self, age: timedelta) -> int:
        cutoff = _iso_utc(_cutoff(age))
        return await self._delete("DELETE FROM call_reports WHERE event_time < ?", [cutoff])

    async def _delete(self, sql: str, params: Sequence[Any]) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            with sqlite_file.transaction(conn):
                return conn.execute(sql, params).rowcount

        return await self._run(delete)

    async def iter_records(
        self, since: datetime, until: datetime | None = None
    ) -> AsyncIterator[tuple[str, bytes]]:
        end = _iso_utc(_window_end(until))
        sql, key = _SQLITE_FIRST_PAGE, (_iso_utc(_aware(since, "since")), "")
        while True:
            params = (*key, end, _PAGE_SIZE)

            def page(
                conn: sqlite3.Connection, sql: str = sql, params: tuple[Any, ...] = params
            ) -> list[tuple[str, str, bytes]]:
                rows: list[tuple[str, str, bytes]] = conn.execute(sql, params).fetchall()
                return rows

            rows = await self._run(page)
            for _, call_id, record in rows:
                yield call_id, bytes(record)
            if len(rows) < _PAGE_SIZE:
                return
            sql, key = _SQLITE_NEXT_PAGE, (rows[-1][0], rows[-1][1])

    async def applied_migrations(self) -> list[int]:
        def versions(conn: sqlite3.Connection) -> list[int]:
            sql = "SELECT version FROM callstream_schema_migrations ORDER BY version"
            return [int(v) for (v,) in conn.execute(sql)]

        return await self._run(versions)


def _migrate_sqlite(conn: sqlite3.Connection) -> None:
    with sqlite_file.transaction(conn):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS callstream_schema_migrations ("
            " version INTEGER NOT NULL PRIMARY KEY,"
            " description TEXT NOT NULL,"
            " applied_at TEXT NOT NULL)"
        )
        applied = {
            int(v) for (v,) in conn.execute("SELECT version FROM callstream_schema_migrations")
        }
        for migration in SQLITE_MIGRATIONS:
            if migration.version in applied:
                continue
            for statement in migration.statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO callstream_schema_migrations (version, description, applied_at)"
                " VALUES (?, ?, ?)",
                (migration.version, migration.description, _iso_utc(datetime.now(UTC))),
            )
            log.info("applied sqlite migration %d: %s", migration.version, migration.description)
        # Not a migration: `callstream erase` creates the same table when it runs first.
        conn.execute(erasures.SQLITE_DDL)
    _warn_about_unknown(applied, SQLITE_MIGRATIONS)


def _warn_about_unknown(applied: set[int], known: tuple[Migration, ...]) -> None:
    unknown = sorted(applied - {m.version for m in known})
    if unknown:
        # A newer release migrated this database and was rolled back. Migrations only
        # add, so this release keeps working, but someone should know.
        log.warning("database has migrations this release does not know: %s", unknown)


# -- PostgreSQL ---------------------------------------------------------------------------

# SQLSTATE classes where the database, not the report, is the problem.
_PG_RETRYABLE_CLASSES: Final = frozenset(
    {
        "08",  # connection exception
        "28",  # invalid authorization (credentials mid-rotation)
        "3D",  # invalid catalog name: the database is not created yet
        "40",  # transaction rollback: serialization failure, deadlock
        "53",  # insufficient resources: too many connections, disk full, out of memory
        "55",  # object not in prerequisite state: lock not available
        "57",  # operator intervention: shutdown, cannot connect now, query cancelled
        "58",  # system error: I/O
    }
)
_PG_RETRYABLE_STATES: Final = frozenset(
    {
        "25006",  # read-only transaction: connected to a standby during failover
        "42501",  # insufficient privilege: grants are fixed by an operator, not by us
    }
)
# An arbitrary constant that only callstream's migrations take (ASCII "callstre").
MIGRATION_LOCK_KEY: Final = 0x63616C6C73747265
# A migration may rebuild an index on a big table; the pool's command timeout is sized
# for batches. Waiting for the lock keeps the pool's timeout, so a stuck peer shows up.
_MIGRATION_TIMEOUT: Final = 3600.0


def _describe(exc: BaseException) -> str:
    return str(classify_postgres(exc)) if isinstance(exc, _PG_ERRORS) else repr(exc)


def classify_postgres(exc: BaseException) -> RetryableError | PermanentError:
    if isinstance(exc, asyncpg.PostgresError):
        state = str(exc.sqlstate or "")
        what = f"{type(exc).__name__} (SQLSTATE {state})"
        if state[:2] in _PG_RETRYABLE_CLASSES or state in _PG_RETRYABLE_STATES:
            return RetryableError(f"PostgreSQL unavailable: {what}: {exc}")
        # Data exceptions (22), constraint violations (23), program limits (54) and
        # anything else the server refuses is about this content: retrying the same
        # batch would fail the same way, so the runner isolates and dead-letters it.
        # The message is left out: servers and the driver quote the refused value
        # (a transcript, a phone number) in it, and this text travels into logs and
        # dead-letter headers. The chained exception keeps it for local debugging.
        return PermanentError(f"PostgreSQL refused the batch: {what}")
    return RetryableError(f"PostgreSQL unavailable: {type(exc).__name__}: {exc}")


# Errors `classify_postgres` understands. Anything else is a bug and propagates as itself.
_PG_ERRORS: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)

_PG_ARRAY_TYPES: Final = {
    "event_time": "timestamptz",
    "received_at": "timestamptz",
    "duration_seconds": "float8",
    "record": "bytea",
    "kafka_partition": "int4",
    "kafka_offset": "int8",
}
_ROW_COLUMNS: Final = COLUMNS[:-1]


def _pg_select_expression(column: str) -> str:
    return f"u.{column}::jsonb" if column in _JSON_COLUMNS else f"u.{column}"


# One statement for the whole batch: each column travels as one array parameter, so the
# statement is prepared once per connection whatever the batch size, and one round trip
# writes every row. The WHERE makes the upsert idempotent and order-proof: equal or older
# versions leave the stored row (and its stored_at) alone.
_PG_UPSERT: Final = (
    f"INSERT INTO call_reports AS stored ({_COLUMN_LIST})"  # noqa: S608
    f" SELECT {', '.join(_pg_select_expression(c) for c in _ROW_COLUMNS)}, ${len(COLUMNS)}"
    " FROM unnest("
    + ", ".join(f"${i}::{_PG_ARRAY_TYPES.get(c, 'text')}[]" for i, c in enumerate(_ROW_COLUMNS, 1))
    + f") AS u({', '.join(_ROW_COLUMNS)})"
    " ON CONFLICT (call_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS if c != "call_id")
    + " WHERE (EXCLUDED.event_time, EXCLUDED.received_at) > (stored.event_time, stored.received_at)"
)
_PG_FETCH: Final = (
    "SELECT "  # noqa: S608
    + ", ".join(f"{c}::text" if c in _JSON_COLUMNS else c for c in COLUMNS)
    + " FROM call_reports WHERE call_id = $1"
)
_PG_ERASE: Final = {
    "phone": "DELETE FROM call_reports WHERE from_number = $1",
    "call_id": "DELETE FROM call_reports WHERE call_id = $1",
    "both": "DELETE FROM call_reports WHERE from_number = $1 AND call_id = $2",
}
_PG_FIRST_PAGE: Final = (
    "SELECT event_time, call_id, record FROM call_reports"
    " WHERE (event_time, call_id) >= ($1, $2) AND event_time < $3"
    " ORDER BY event_time, call_id LIMIT $4"
)
_PG_NEXT_PAGE: Final = _PG_FIRST_PAGE.replace(">=", ">")


def _status_count(status: str) -> int:
    """Rows from a command tag such as 'INSERT 0 12' or 'DELETE 3'."""
    return int(status.rsplit(" ", 1)[-1])


def _same_time(moment: datetime) -> datetime:
    return moment


class PostgresBackend(StorageBackend):
    """asyncpg with a small pool; migrations under an advisory lock."""

    name: BackendName = "postgresql"

    def __init__(
        self,
        dsn: str,
        *,
        max_connections: int = 4,
        connect_timeout: float = 10.0,
        command_timeout: float = 60.0,
    ) -> None:
        self._dsn = dsn
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._migrated = False
        self._opening = asyncio.Lock()
        self._erased = erasures.Erased()

    async def open(self) -> None:
        await self._ready()

    async def _ready(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._migrated and self._pool is not None:
            return self._pool
        async with self._opening:
            try:
                if self._pool is None:
                    # min_size=0: creating the pool never connects, so it cannot fail
                    # while the server is down, and nothing keeps dialling a dead one.
                    self._pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=0,
                        max_size=self._max_connections,
                        timeout=self._connect_timeout,
                        command_timeout=self._command_timeout,
                        server_settings={"application_name": "callstream-storage"},
                    )
                if not self._migrated:
                    async with self._pool.acquire() as conn:
                        await _migrate_postgres(conn)
                    self._migrated = True
            except Exception as exc:
                # Whatever stops the schema from being ready (server down, a URL it
                # refuses, a migration that fails) is the database's state, not any
                # report's fault: the runner must hold the batch, not dead-letter it.
                raise RetryableError(f"storage database not ready: {_describe(exc)}") from exc
            return self._pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        self._migrated = False
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=self._connect_timeout)
        except (TimeoutError, *_PG_ERRORS):
            # A server that stopped answering cannot be told goodbye; drop the sockets.
            pool.terminate()

    async def write(self, batch: Sequence[Delivery], stored_at: datetime) -> Written:
        if not batch:
            return Written(0, 0)
        pool = await self._ready()
        try:
            # READ COMMITTED whatever the server's default: the log read must see an
            # erasure committed while this write waited for the fence.
            async with pool.acquire() as conn, conn.transaction(isolation="read_committed"):
                # Shared with every other write, exclusive for an erasure in progress: the
                # log read below cannot miss an erasure whose DELETE misses these rows.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock_shared($1)", erasures.WRITE_FENCE_KEY
                )
                self._erased.add(
                    tuple(row)
                    for row in await conn.fetch(erasures.POSTGRES_SINCE, self._erased.last_id)
                )
                kept = [d for d in batch if not self._erased.covers(d.report)]
                rows = _rows(kept, _same_time, _without_nul, sanitise=True)
                written = 0
                if rows:
                    columns = [list(column) for column in zip(*rows, strict=True)]
                    written = _status_count(await conn.execute(_PG_UPSERT, *columns, stored_at))
                return Written(written, len(batch) - len(kept))
        except _PG_ERRORS as exc:
            raise classify_postgres(exc) from exc

    async def fetch(self, call_id: str) -> StoredReport | None:
        row = await self._fetchrow(_PG_FETCH, _without_nul(call_id))
        return None if row is None else _stored(tuple(row), _same_time)

    async def count(self) -> int:
        rows = await self._fetch("SELECT count(*) FROM call_reports")
        return int(rows[0][0])

    async def erase(self, phone: str | None, call_id: str | None) -> int:
        sql, params = _erase_statement(
            _optional(phone, _without_nul), _optional(call_id, _without_nul), _PG_ERASE
        )
        return await self._delete(sql, *params)

    async def purge_older_than(self, age: timedelta) -> int:
        cutoff = _cutoff(age)
        return await self._delete("DELETE FROM call_reports WHERE event_time < $1", cutoff)

    async def iter_records(
        self, since: datetime, until: datetime | None = None
    ) -> AsyncIterator[tuple[str, bytes]]:
        # Keyset pages rather than a server-side cursor: a cursor needs a transaction
        # held open for as long as the caller takes to republish everything.
        end = _window_end(until)
        sql, key = _PG_FIRST_PAGE, (_aware(since, "since"), "")
        while True:
            rows = await self._fetch(sql, *key, end, _PAGE_SIZE)
            for row in rows:
                yield row["call_id"], bytes(row["record"])
            if len(rows) < _PAGE_SIZE:
                return
            sql, key = _PG_NEXT_PAGE, (rows[-1]["event_time"], rows[-1]["call_id"])

    async def applied_migrations(self) -> list[int]:
        rows = await self._fetch(
            "SELECT version FROM callstream_schema_migrations ORDER BY version"
        )
        return [int(row["version"]) for row in rows]

    async def _fetch(self, sql: str, *params: Any) -> list[asyncpg.Record]:
        pool = await self._ready()
        try:
            async with pool.acquire() as conn:
                return await conn.fetch(sql, *params)
        except _PG_ERRORS as exc:
            raise classify_postgres(exc) from exc

    async def _fetchrow(self, sql: str, *params: Any) -> asyncpg.Record | None:
        rows = await self._fetch(sql, *params)
        return rows[0] if rows else None

    async def _delete(self, sql: str, *params: Any) -> int:
        pool = await self._ready()
        try:
            async with pool.acquire() as conn:
                return _status_count(await conn.execute(sql, *params))
        except _PG_ERRORS as exc:
            raise classify_postgres(exc) from exc


async def _migrate_postgres(conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record]) -> None:
    async with conn.transaction():
        # Taken before even the bookkeeping table exists: two instances starting at once
        # would otherwise race on CREATE TABLE IF NOT EXISTS (a unique violation in
        # pg_type) and on applying the same migration twice. Released at commit.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS callstream_schema_migrations ("
            " version integer PRIMARY KEY,"
            " description text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = {
            int(row["version"])
            for row in await conn.fetch("SELECT version FROM callstream_schema_migrations")
        }
        for migration in POSTGRES_MIGRATIONS:
            if migration.version in applied:
                continue
            for statement in migration.statements:
                await conn.execute(statement, timeout=_MIGRATION_TIMEOUT)
            await conn.execute(
                "INSERT INTO callstream_schema_migrations (version, description) VALUES ($1, $2)",
                migration.version,
                migration.description,
            )
            log.info(
                "applied postgresql migration %d: %s", migration.version, migration.description
            )
    _warn_about_unknown(applied, POSTGRES_MIGRATIONS)
    # Not a migration (`callstream erase` creates the same table when it runs first), and in
    # a transaction of its own: an erasure must never wait for a long migration.
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", erasures.DDL_LOCK_KEY)
        await conn.execute(erasures.POSTGRES_DDL)
