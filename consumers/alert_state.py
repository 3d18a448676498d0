"""The durable record of what the alerting consumer has sent: one row per
(rule, call_id, channel), so a redelivered or replayed report never alerts twice.

Order of events for one alert, and what a crash at each point means:

1. `claim` writes status `sending` (committed, fsynced) before anything leaves the process.
2. The channel delivers.
3. `mark_sent` / `mark_dead_lettered` commits the outcome.

A crash between 2 and 3 leaves `sending`. The next claim of that key answers `resend` and
the alert goes out again: **at most one duplicate per crash, for that one alert**, never a
lost alert. Alerting prefers a rare duplicate to silence; generic webhooks carry a stable
`alert_id` (and e-mails a stable Message-ID) so receivers can drop the duplicate. Keys
already `sent` or `dead_lettered` answer `done` and are not sent again.

SQLite runs in WAL mode with synchronous=FULL so a commit is on disk before it returns.
Every call goes through `asyncio.to_thread`; one lock serialises use of the connection.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal, NamedTuple, TypeAlias, TypeVar

ClaimStatus: TypeAlias = Literal["new", "resend", "done"]
SCHEMA_VERSION: Final = 1

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS alert_notifications (
    rule        TEXT    NOT NULL,
    call_id     TEXT    NOT NULL,
    channel     TEXT    NOT NULL,
    status      TEXT    NOT NULL CHECK (status IN ('sending', 'sent', 'dead_lettered')),
    claims      INTEGER NOT NULL DEFAULT 1,  -- > 1: an earlier attempt was interrupted
    attempts    INTEGER NOT NULL DEFAULT 0,  -- delivery attempts of the final claim
    created_at  TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL,
    PRIMARY KEY (rule, call_id, channel)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alert_dead_letters (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    rule         TEXT    NOT NULL,
    call_id      TEXT    NOT NULL,
    channel      TEXT    NOT NULL,
    channel_type TEXT    NOT NULL,
    reason       TEXT    NOT NULL,
    detail       TEXT    NOT NULL,
    attempts     INTEGER NOT NULL,
    created_at   TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS alert_dead_letters_call ON alert_dead_letters (call_id);
"""

T = TypeVar("T")


class StateUnavailable(Exception):
    """The state database cannot be read or written (locked, disk full, gone)."""


class AlertKey(NamedTuple):
    rule: str
    call_id: str
    channel: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    rule: str
    call_id: str
    channel: str
    channel_type: str
    reason: str
    detail: str
    attempts: int
    created_at: str


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AlertState:
    def __init__(self, path: Path, *, busy_timeout: float = 5.0) -> None:
        self._path = path
        self._busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._path

    async def open(self) -> None:
        await self._run(self._open)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.to_thread(self._close, conn)

    def _close(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            conn.close()

    def _open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout,
            isolation_level=None,  # explicit BEGIN/COMMIT below
            check_same_thread=False,  # to_thread uses a pool; the lock serialises use
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StateUnavailable(
                    f"{self._path} was written by a newer callstream (schema {version})"
                )
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def _run(self, work: Callable[[], T]) -> T:
        def locked() -> T:
            with self._lock:
                return work()

        try:
            return await asyncio.to_thread(locked)
        except StateUnavailable:
            raise
        except (sqlite3.Error, OSError) as exc:
            raise StateUnavailable(f"alert state {self._path}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StateUnavailable(f"alert state {self._path} is not open")
        return self._conn

    async def claim(self, keys: Sequence[AlertKey]) -> dict[AlertKey, ClaimStatus]:
        """Mark each key `sending` unless it is already finished; one transaction, fsynced."""

        def work() -> dict[AlertKey, ClaimStatus]:
            conn = self._connection()
            now = _now()
            out: dict[AlertKey, ClaimStatus] = {}
            conn.execute("BEGIN IMMEDIATE")
            try:
                for key in keys:
                    row = conn.execute(
                        "SELECT status FROM alert_notifications"
                        " WHERE rule = ? AND call_id = ? AND channel = ?",
                        key,
                    ).fetchone()
                    if row is None:
                        conn.execute(
                            "INSERT INTO alert_notifications"
                            " (rule, call_id, channel, status, created_at, updated_at)"
                            " VALUES (?, ?, ?, 'sending', ?, ?)",
                            (*key, now, now),
                        )
                        out[key] = "new"
                    elif row[0] == "sending":
                        conn.execute(
                            "UPDATE alert_notifications SET claims = claims + 1, updated_at = ?"
                            " WHERE rule = ? AND call_id = ? AND channel = ?",
                            (now, *key),
                        )
                        out[key] = "resend"
                    else:
                        out[key] = "done"
                conn.execute("COMMIT")
            except BaseException:
                conn.rollback()
                raise
            return out

        return await self._run(work)

    async def mark_sent(self, key: AlertKey, attempts: int) -> None:
        def work() -> None:
            self._connection().execute(
                "UPDATE alert_notifications SET status = 'sent', attempts = ?, updated_at = ?"
                " WHERE rule = ? AND call_id = ? AND channel = ?",
                (attempts, _now(), *key),
            )

        await self._run(work)

    async def mark_dead_lettered(
        self, key: AlertKey, *, channel_type: str, reason: str, detail: str, attempts: int
    ) -> None:
        def work() -> None:
            conn = self._connection()
            now = _now()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "UPDATE alert_notifications SET status = 'dead_lettered', attempts = ?,"
                    " updated_at = ? WHERE rule = ? AND call_id = ? AND channel = ?",
                    (attempts, now, *key),
                )
                conn.execute(
                    "INSERT INTO alert_dead_letters (rule, call_id, channel, channel_type,"
                    " reason, detail, attempts, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (*key, channel_type, reason, detail, attempts, now),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.rollback()
                raise

        await self._run(work)

    async def status(self, key: AlertKey) -> str | None:
        def work() -> str | None:
            row = (
                self._connection()
                .execute(
                    "SELECT status FROM alert_notifications"
                    " WHERE rule = ? AND call_id = ? AND channel = ?",
                    key,
                )
                .fetchone()
            )
            return None if row is None else str(row[0])

        return await self._run(work)

    async def dead_letters(self) -> list[DeadLetter]:
        def work() -> list[DeadLetter]:
            rows = (
                self._connection()
                .execute(
                    "SELECT rule, call_id, channel, channel_type, reason, detail, attempts,"
                    " created_at FROM alert_dead_letters ORDER BY id"
                )
                .fetchall()
            )
            return [DeadLetter(*row) for row in rows]

        return await self._run(work)
