"""The SQLite files consumers keep (storage's database, alerting's sent-alert state, the
metrics ledger): opened one way, and used from one thread.

* `connect`: WAL, so readers (`callstream erase`, a sqlite3 shell) do not block the
  consumer; synchronous=FULL, because the runner commits Kafka offsets as soon as a handler
  returns, so a COMMIT must be on disk by then; transactions begun and ended explicitly
  (isolation_level=None); a busy timeout for the moments another process writes.
* `SqliteThread`: the connection lives on one dedicated thread and calls queue there in
  order. A caller cancelled mid-call (a rebalance, a shutdown) cannot stop the thread; the
  next call waits behind it instead of sharing the connection with it, and a call that
  failed inside a transaction is rolled back before the next one runs.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

_T = TypeVar("_T")


def connect(path: Path, *, busy_timeout: float) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot use WAL on {path}: got {mode}")
        conn.execute("PRAGMA synchronous = FULL")
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT; SqliteThread rolls back if the block raises.

    IMMEDIATE takes the write lock up front, so a second writer waits out the busy timeout
    instead of failing midway with SQLITE_BUSY when its read lock cannot upgrade.
    """
    conn.execute("BEGIN IMMEDIATE")
    yield
    conn.execute("COMMIT")


def ensure_layout(conn: sqlite3.Connection, version: int, ddl: str, what: str) -> None:
    """Create the tables (`ddl`, idempotent) and stamp PRAGMA user_version; refuse a file
    that a newer release laid out differently."""
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > version:
        raise sqlite3.DatabaseError(
            f"{what} has layout v{found}, newer than this release's v{version}"
        )
    conn.executescript(ddl)
    conn.execute(f"PRAGMA user_version = {int(version)}")


def connect_laid_out(
    path: Path, *, busy_timeout: float, version: int, ddl: str, what: str
) -> sqlite3.Connection:
    conn = connect(path, busy_timeout=busy_timeout)
    try:
        ensure_layout(conn, version, ddl, what)
    except BaseException:
        conn.close()
        raise
    return conn


class SqliteThread:
    """One connection, opened by `opener` on first use (or `open`), used only from one
    thread, until `close`.

    `failure` turns what SQLite or the file system raised into the caller's own error
    (RetryableError for a consumer, and so on); anything else passes through unchanged.
    """

    def __init__(
        self,
        name: str,
        opener: Callable[[], sqlite3.Connection],
        failure: Callable[[Exception], Exception],
    ) -> None:
        self._name = name
        self._opener = opener
        self._failure = failure
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    async def open(self) -> None:
        """Connect now rather than on first use (again after `close`)."""
        self._closed = False
        await self.run(lambda conn: None)

    async def run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed:
            # A call racing a shutdown: the owner's retryable error, never a new connection
            # that nothing would close.
            raise self._failure(ConnectionError(f"{self._name}: closed"))
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=self._name)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._call, fn)
        except (sqlite3.Error, OSError) as exc:
            raise self._failure(exc) from exc

    def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._conn is None:
            self._conn = self._opener()
        conn = self._conn
        try:
            return fn(conn)
        except BaseException:
            # Whatever failed (a statement, or COMMIT itself on a full disk), the next call
            # must not find itself inside this transaction; a connection that cannot even
            # roll back is replaced.
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    self._conn = None
                    conn.close()
            raise

    async def close(self) -> None:
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        try:
            # Queued behind any call still running, so it never closes under one.
            await loop.run_in_executor(executor, self._close_connection)
        finally:
            executor.shutdown(wait=False)

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
