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

A dead-lettered alert keeps what it said (the privacy-safe alert context, as JSON) in its
`alert_dead_letters` row, so `callstream alerts retry` can send that same alert again later
(consumers/alerting/redelivery.py). A retry claims the dead letter (`retry_started_at`)
rather than the notification, whose status stays `dead_lettered` until the retry delivers:
the consumer keeps answering `done` for it, so a replay running beside a retry never sends
the alert a second time.

The file is opened and used as consumers.sqlite_file describes: a commit is on disk before
it returns, and one thread owns the connection.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple, TypeAlias

import orjson

from consumers import sqlite_file
from consumers.alerting.channels import AlertContext
from consumers.sqlite_file import SqliteThread

ClaimStatus: TypeAlias = Literal["new", "resend", "done"]
SCHEMA_VERSION: Final = 2

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
    created_at   TEXT    NOT NULL,
    context          TEXT,     -- the alert as sent (JSON); NULL if dead-lettered before v2
    retry_started_at TEXT,     -- a retry is sending it (or was, until it was interrupted)
    retries          INTEGER NOT NULL DEFAULT 0,
    retried_at       TEXT,     -- when the last retry finished
    retry_error      TEXT,     -- why the last retry failed; NULL once one delivered
    resolved_at      TEXT      -- a retry delivered it
);
CREATE INDEX IF NOT EXISTS alert_dead_letters_call ON alert_dead_letters (call_id);
"""

# v1 -> v2: the dead-letter columns a retry needs, added to a file an older release laid out.
_V2_DEAD_LETTER_COLUMNS: Final = (
    ("context", "TEXT"),
    ("retry_started_at", "TEXT"),
    ("retries", "INTEGER NOT NULL DEFAULT 0"),
    ("retried_at", "TEXT"),
    ("retry_error", "TEXT"),
    ("resolved_at", "TEXT"),
)


class StateUnavailable(Exception):
    """The state database cannot be read or written (locked, disk full, gone)."""


class AlertKey(NamedTuple):
    rule: str
    call_id: str
    channel: str


def _iso(moment: datetime) -> str:
    # One fixed format (UTC, milliseconds, Z), so stored times compare as text.
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _now() -> str:
    return _iso(datetime.now(UTC))


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An alert given up on, what it said, and what retries made of it."""

    id: int
    key: AlertKey
    channel_type: str
    reason: str
    detail: str
    attempts: int
    created_at: str
    context: AlertContext | None  # None: dead-lettered by a release that did not keep it
    retry_started_at: str | None
    retries: int
    retried_at: str | None
    retry_error: str | None
    resolved_at: str | None

    @property
    def error(self) -> str:
        """The latest reason it was not delivered."""
        return self.retry_error or f"{self.reason}: {self.detail}"


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """One (rule, call, channel) and the latest dead letter for it, if any."""

    key: AlertKey
    status: str
    attempts: int
    claims: int
    created_at: str
    updated_at: str
    dead_letter: DeadLetter | None


def _columns(alias: str, record: type[Any], but: str = "") -> str:
    """The record's fields in order as columns, the key's three spelled out: rows are read
    back into the record by position, so the SELECT must follow its fields."""
    key = ("rule", "call_id", "channel")
    names = [
        n for f in fields(record) if f.name != but for n in (key if f.name == "key" else (f.name,))
    ]
    return ", ".join(f"{alias}.{name}" for name in names)


_DEAD_LETTER_COLUMNS: Final = _columns("d", DeadLetter)
# Built from the dataclasses' field names, never from input: S608 does not apply.
_HISTORY: Final = (
    f"SELECT {_columns('n', AlertRecord, but='dead_letter')}, {_DEAD_LETTER_COLUMNS}"  # noqa: S608
    " FROM alert_notifications n LEFT JOIN alert_dead_letters d ON d.id = ("
    "   SELECT max(x.id) FROM alert_dead_letters x"
    "   WHERE x.call_id = n.call_id AND x.rule = n.rule AND x.channel = n.channel)"
    " WHERE n.updated_at >= ? AND (? = 0 OR n.status = 'dead_lettered')"
    " ORDER BY n.updated_at, n.rule, n.call_id, n.channel"
)
_DEAD_LETTER: Final = f"SELECT {_DEAD_LETTER_COLUMNS} FROM alert_dead_letters d WHERE d.id = ?"  # noqa: S608
_UNRESOLVED: Final = (
    f"SELECT {_DEAD_LETTER_COLUMNS} FROM alert_dead_letters d"  # noqa: S608
    " JOIN alert_notifications n"
    "   ON n.rule = d.rule AND n.call_id = d.call_id AND n.channel = d.channel"
    " WHERE d.resolved_at IS NULL AND n.status = 'dead_lettered'"
    " AND d.created_at >= ? ORDER BY d.id"
)


def _dead_letter(row: Sequence[Any]) -> DeadLetter:
    # The context is kept as the JSON of its fields.
    context = None if row[9] is None else AlertContext(**orjson.loads(row[9]))
    # One list: mypy cannot count arguments after a starred slice. The SELECT follows the
    # fields (_columns).
    return DeadLetter(*[row[0], AlertKey(*row[1:4]), *row[4:9], context, *row[10:]])


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    # Judged by the columns present, not by user_version: a crash between the stamp and the
    # ALTERs, or two processes opening the file at once, must still end with every column.
    with sqlite_file.transaction(conn):
        present = {str(row[1]) for row in conn.execute("PRAGMA table_info(alert_dead_letters)")}
        for name, declaration in _V2_DEAD_LETTER_COLUMNS:
            if name not in present:
                conn.execute(f"ALTER TABLE alert_dead_letters ADD COLUMN {name} {declaration}")


def _since(moment: datetime | None) -> str:
    return "" if moment is None else _iso(moment)  # "": every stored time is later


def _finish(conn: sqlite3.Connection, key: AlertKey, status: str, attempts: int, now: str) -> None:
    conn.execute(
        "UPDATE alert_notifications SET status = ?, attempts = ?, updated_at = ?"
        " WHERE rule = ? AND call_id = ? AND channel = ?",
        (status, attempts, now, *key),
    )


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
        conn = sqlite_file.connect_laid_out(
            self._path,
            busy_timeout=self._busy_timeout,
            version=SCHEMA_VERSION,
            ddl=_SCHEMA,
            what=f"alert state {self._path}",
        )
        try:
            _add_missing_columns(conn)
        except BaseException:
            conn.close()
            raise
        return conn

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
        await self._db.run(lambda conn: _finish(conn, key, "sent", attempts, _now()))

    async def mark_dead_lettered(
        self,
        key: AlertKey,
        *,
        channel_type: str,
        reason: str,
        detail: str,
        attempts: int,
        context: AlertContext,
    ) -> None:
        kept = orjson.dumps(context).decode()  # the JSON of its fields, as _dead_letter reads it

        def work(conn: sqlite3.Connection) -> None:
            now = _now()
            with sqlite_file.transaction(conn):
                _finish(conn, key, "dead_lettered", attempts, now)
                conn.execute(
                    "INSERT INTO alert_dead_letters (rule, call_id, channel, channel_type,"
                    " reason, detail, attempts, created_at, context)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*key, channel_type, reason, detail, attempts, now, kept),
                )

        await self._db.run(work)

    async def status(self, key: AlertKey) -> str | None:
        return await self._db.run(lambda conn: _status(conn, key))

    async def history(self, *, since: datetime | None, failed_only: bool) -> list[AlertRecord]:
        """Every (rule, call, channel) changed since `since`, oldest change first."""

        def work(conn: sqlite3.Connection) -> list[AlertRecord]:
            records: list[AlertRecord] = []
            for row in conn.execute(_HISTORY, (_since(since), int(failed_only))):
                dead_letter = None if row[8] is None else _dead_letter(row[8:])
                # The notification's columns are AlertRecord's fields in order (_columns).
                records.append(AlertRecord(*[AlertKey(*row[:3]), *row[3:8], dead_letter]))
            return records

        return await self._db.run(work)

    async def dead_letter(self, dead_letter_id: int) -> DeadLetter | None:
        def work(conn: sqlite3.Connection) -> DeadLetter | None:
            row = conn.execute(_DEAD_LETTER, (dead_letter_id,)).fetchone()
            return None if row is None else _dead_letter(row)

        return await self._db.run(work)

    async def unresolved_dead_letters(self, *, since: datetime | None) -> list[DeadLetter]:
        """Dead letters given up on since `since` that no retry has delivered, oldest first."""

        def work(conn: sqlite3.Connection) -> list[DeadLetter]:
            return [_dead_letter(row) for row in conn.execute(_UNRESOLVED, (_since(since),))]

        return await self._db.run(work)

    async def claim_retry(self, dead_letter_id: int, *, stale_before: datetime) -> bool:
        """Take this dead letter for one retry; False if it is delivered, or if another retry
        started it after `stale_before` (that one may still be sending)."""

        def work(conn: sqlite3.Connection) -> bool:
            with sqlite_file.transaction(conn):
                cursor = conn.execute(
                    "UPDATE alert_dead_letters SET retry_started_at = ?"
                    " WHERE id = ? AND resolved_at IS NULL"
                    " AND (retry_started_at IS NULL OR retry_started_at < ?)"
                    " AND EXISTS (SELECT 1 FROM alert_notifications n"
                    "   WHERE n.rule = alert_dead_letters.rule"
                    "   AND n.call_id = alert_dead_letters.call_id"
                    "   AND n.channel = alert_dead_letters.channel"
                    "   AND n.status = 'dead_lettered')",
                    (_now(), dead_letter_id, _iso(stale_before)),
                )
                return cursor.rowcount == 1

        return await self._db.run(work)

    async def retry_delivered(self, dead_letter: DeadLetter, attempts: int) -> None:
        def work(conn: sqlite3.Connection) -> None:
            now = _now()
            with sqlite_file.transaction(conn):
                conn.execute(
                    "UPDATE alert_dead_letters SET resolved_at = ?, retried_at = ?,"
                    " retries = retries + 1, retry_started_at = NULL, retry_error = NULL"
                    " WHERE id = ?",
                    (now, now, dead_letter.id),
                )
                _finish(conn, dead_letter.key, "sent", attempts, now)

        await self._db.run(work)

    async def retry_failed(self, dead_letter: DeadLetter, error: str, attempts: int) -> None:
        def work(conn: sqlite3.Connection) -> None:
            now = _now()
            with sqlite_file.transaction(conn):
                conn.execute(
                    "UPDATE alert_dead_letters SET retried_at = ?, retries = retries + 1,"
                    " retry_started_at = NULL, retry_error = ? WHERE id = ?",
                    (now, error, dead_letter.id),
                )
                # attempts 0: nothing was sent (the channel is gone); keep the last count.
                conn.execute(
                    "UPDATE alert_notifications"
                    " SET attempts = CASE WHEN ? > 0 THEN ? ELSE attempts END, updated_at = ?"
                    " WHERE rule = ? AND call_id = ? AND channel = ?",
                    (attempts, attempts, now, *dead_letter.key),
                )

        await self._db.run(work)
