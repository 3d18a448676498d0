"""Running storage scripts on each database: SQLite on its connection's own thread, and
PostgreSQL through a small asyncpg pool. Both connect and migrate on `open` or on first
use, so a database that was down at start-up is picked up once it is back.

Errors leave here already sorted for the runner: the database being unreachable, busy or
out of resources is `RetryableError`; content it refuses is `PermanentError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeAlias, TypeVar

import asyncpg

from consumers import sqlite_file
from consumers.errors import PermanentError, RetryableError
from consumers.sqlite_file import SqliteThread
from consumers.storage.dialects import POSTGRES, SQLITE, Dialect
from consumers.storage.statements import Result, Script
from core.logs import Throttled

_T = TypeVar("_T")
log = logging.getLogger(__name__)
if TYPE_CHECKING:
    _PgConnection: TypeAlias = asyncpg.pool.PoolConnectionProxy[asyncpg.Record]

# The scripts that make a database ready for a connection's user, each run in a
# transaction of its own when it connects: the storage schema and the erasure log for the
# backend, the erasure log alone for `callstream erase` (consumers.storage.erasures).
Schema = Callable[[Dialect], Iterable[Script[None]]]


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


def _drive_sqlite(conn: sqlite3.Connection, script: Script[_T]) -> _T:
    try:
        statement = next(script)
        while True:
            execute = conn.executemany if statement.many else conn.execute
            cursor = execute(statement.sql, statement.params)
            rows = cursor.fetchall() if statement.returns_rows else []
            statement = script.send(Result(rows, cursor.rowcount))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


class _Checkpointer:
    """Copies the WAL into the database file on a connection and a thread of its own, after
    each write, one checkpoint at a time.

    A checkpoint run by the writer itself happens inside a COMMIT and holds up the batch
    behind it while it copies and fsyncs the WAL's pages (60-100 ms for 32 MB here, about
    once a second at 1,000 reports/s). Run beside the writer, small and often, it costs a
    commit a few ms of a shared journal flush instead (docs/performance.md).
    """

    def __init__(self, path: Path, busy_timeout: float) -> None:
        self._db = SqliteThread(
            "callstream-sqlite-checkpoint",
            lambda: sqlite_file.connect(path, busy_timeout=busy_timeout),
            classify_sqlite,
        )
        self._running: asyncio.Task[None] | None = None
        # A write landed since the running checkpoint began: it may have missed that write.
        self._again = False
        self._failed = Throttled(log, interval=60.0)

    def after_write(self) -> None:
        self._again = True
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._checkpoint())

    async def _checkpoint(self) -> None:
        while self._again:
            self._again = False
            try:
                # PASSIVE never waits for the writer: it copies what is committed and not
                # being read.
                await self._db.run(
                    lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                )
            except (RetryableError, PermanentError) as exc:
                # The writer's own autocheckpoint (every 32 MB) is the backstop.
                self._failed.warning("background WAL checkpoint failed: %s", exc)

    async def close(self) -> None:
        if self._running is not None:
            await asyncio.wait([self._running])
        await self._db.close()


class SqliteConnection:
    """One file, opened and used the way consumers.sqlite_file describes."""

    dialect = SQLITE

    def __init__(
        self, path: Path, schema: Schema, *, busy_timeout: timedelta = timedelta(seconds=5)
    ) -> None:
        self.path = Path(path)
        self._schema = schema
        self._busy_timeout = busy_timeout.total_seconds()
        self._db = SqliteThread("callstream-sqlite", self._connect, classify_sqlite)
        self._checkpointer = _Checkpointer(self.path, self._busy_timeout)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite_file.connect(self.path, busy_timeout=self._busy_timeout)
        try:
            # _Checkpointer keeps the WAL short; should it fall behind, the writer's own
            # checkpoint takes over at 32 MB (the default 4 MB is every second COMMIT of a
            # 500-report batch).
            conn.execute("PRAGMA wal_autocheckpoint = 8192")
            for script in self._schema(SQLITE):
                with sqlite_file.transaction(conn):
                    _drive_sqlite(conn, script)
        except BaseException:
            conn.close()
            raise
        return conn

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._checkpointer.close()
        await self._db.close()

    async def run(self, script: Script[_T], *, transaction: bool = False) -> _T:
        def work(conn: sqlite3.Connection) -> _T:
            # BEGIN IMMEDIATE: the whole script runs under the write lock.
            with sqlite_file.transaction(conn) if transaction else contextlib.nullcontext():
                return _drive_sqlite(conn, script)

        try:
            result = await self._db.run(work)
        except UnicodeEncodeError as exc:
            # A string with lone surrogates cannot be UTF-8; retrying cannot help.
            raise PermanentError(f"SQLite refused the batch: {exc.reason}") from exc
        if transaction:
            self._checkpointer.after_write()
        return result

    def lock(self, key: int) -> contextlib.AbstractAsyncContextManager[None]:
        """Nothing: writers to one SQLite file already take turns on its write lock."""
        return contextlib.nullcontext()


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


def _status_count(status: str) -> int:
    """Rows from a command tag such as 'INSERT 0 12' or 'DELETE 3'; 0 for 'CREATE TABLE'."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


async def _drive_postgres(conn: _PgConnection, script: Script[_T]) -> _T:
    try:
        statement = next(script)
        while True:
            sql, params = statement.sql, statement.params
            if statement.returns_rows:
                rows = [tuple(row) for row in await conn.fetch(sql, *params)]
                result = Result(rows, len(rows))
            else:
                status = await conn.execute(sql, *params, timeout=statement.timeout)
                result = Result([], _status_count(status))
            statement = script.send(result)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


class PostgresConnection:
    """asyncpg with a small pool; migrations under an advisory lock."""

    dialect = POSTGRES

    def __init__(
        self,
        dsn: str,
        schema: Schema,
        *,
        max_connections: int = 4,
        connect_timeout: float = 10.0,
        command_timeout: float | None = 60.0,
    ) -> None:
        self._dsn = dsn
        self._schema = schema
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._migrated = False
        self._opening = asyncio.Lock()

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
                        for script in self._schema(POSTGRES):
                            async with conn.transaction():
                                await _drive_postgres(conn, script)
                    self._migrated = True
            except Exception as exc:
                # Whatever stops the schema from being ready (server down, a URL it
                # refuses, a migration that fails) is the database's state, not any
                # report's fault: the runner must hold the batch, not dead-letter it.
                what = str(classify_postgres(exc)) if isinstance(exc, _PG_ERRORS) else repr(exc)
                raise RetryableError(f"storage database not ready: {what}") from exc
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

    async def run(self, script: Script[_T], *, transaction: bool = False) -> _T:
        pool = await self._ready()
        try:
            async with pool.acquire() as conn:
                if not transaction:
                    return await _drive_postgres(conn, script)
                # READ COMMITTED whatever the server's default: a write's read of the
                # erasure log must see an erasure committed while it waited for the fence.
                async with conn.transaction(isolation="read_committed"):
                    return await _drive_postgres(conn, script)
        except _PG_ERRORS as exc:
            raise classify_postgres(exc) from exc

    @contextlib.asynccontextmanager
    async def lock(self, key: int) -> AsyncIterator[None]:
        """Hold the advisory lock `key` exclusively until the block ends: a session lock on
        a connection of its own, so that work on other connections commits while it is
        held, and closing the connection releases it."""
        try:
            conn = await asyncpg.connect(
                self._dsn, timeout=self._connect_timeout, server_settings=_KEEPALIVES
            )
        except _PG_ERRORS as exc:
            raise classify_postgres(exc) from exc
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", key)
            yield
        finally:
            await conn.close()


# For a lock held while others wait on it: if this host vanishes, the server drops the
# lock (and the waiting writes go on) within half a minute, not after hours.
_KEEPALIVES: Final = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
}

Connection = SqliteConnection | PostgresConnection
