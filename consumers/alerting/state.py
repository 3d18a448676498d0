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

The file is opened and used as consumers.sqlite_file describes: a commit is on disk before
it returns, and one thread owns the connection.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal, NamedTuple, TypeAlias

from consumers import sqlite_file
from consumers.sqlite_file import SqliteThread

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


class StateUnavailable(Exception):
    """The state database cannot be read or written (locked, disk full, gone)."""


class AlertKey(NamedTuple):
    rule: str
    call_id: str
    channel: str


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _status(conn: sqlite3.Connection, key: AlertKey) -> str | None:
    row = conn.execute(
        "SELECT status FROM alert_notifications WHERE rule = ? AND call_id = ? AND channel = ?",
        key,
    ).fetchone()
    return None if row is None else str(row[0])


class AlertState:
    def __init__(self, path: Path, *, busy_timeout: float = 5.0) -> None:
        self._path = path
        self._busy_timeout = busy_timeout
        self._db = SqliteThread("callstream-alert-state", self._connect, self._unavailable)

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    def _connect(self) -> sqlite3.Connection:
        return sqlite_file.connect_laid_out(
            self._path,
            busy_timeout=self._busy_timeout,
            version=SCHEMA_VERSION,
            ddl=_SCHEMA,
            what=f"alert state {self._path}",
        )

    def _unavailable(self, exc: Exception) -> Exception:
        return StateUnavailable(f"alert state {self._path}: {exc}")

    async def claim(self, keys: Sequence[AlertKey]) -> dict[AlertKey, ClaimStatus]:
        """Mark each key `sending` unless it is already finished; one transaction, fsynced."""

        def work(conn: sqlite3.Connection) -> dict[AlertKey, ClaimStatus]:
            now = _now()
            out: dict[AlertKey, ClaimStatus] = {}
            with sqlite_file.transaction(conn):
                for key in keys:
                    status = _status(conn, key)
                    if status is None:
                        conn.execute(
                            "INSERT INTO alert_notifications"
                            " (rule, call_id, channel, status, created_at, updated_at)"
                            " VALUES (?, ?, ?, 'sending', ?, ?)",
                            (*key, now, now),
                        )
                        out[key] = "new"
                    elif status == "sending":
                        conn.execute(
                            "UPDATE alert_notifications SET claims = claims + 1, updated_at = ?"
                            " WHERE rule = ? AND call_id = ? AND channel = ?",
                            (now, *key),
                        )
                        out[key] = "resend"
                    else:
                        out[key] = "done"
            return out

        return await self._db.run(work)

    async def mark_sent(self, key: AlertKey, attempts: int) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE alert_notifications SET status = 'sent', attempts = ?, updated_at = ?"
                " WHERE rule = ? AND call_id = ? AND channel = ?",
                (attempts, _now(), *key),
            )

        await self._db.run(work)

    async def mark_dead_lettered(
        self, key: AlertKey, *, channel_type: str, reason: str, detail: str, attempts: int
    ) -> None:
        def work(conn: sqlite3.Connection) -> None:
            now = _now()
            with sqlite_file.transaction(conn):
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

        await self._db.run(work)

    async def status(self, key: AlertKey) -> str | None:
        return await self._db.run(lambda conn: _status(conn, key))
