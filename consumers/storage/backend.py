"""The storage backend: what the consumer, `callstream erase` and replays do with stored
reports, written once for SQLite (default, no server) and PostgreSQL: one row per call in
`call_reports`, the newest version of its report by (event_time, received_at), and each
call's status updates in `call_events` (consumers.storage.timeline).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Self

from consumers.contract import Delivery, EventDelivery
from consumers.storage import erasures, timeline
from consumers.storage.connections import Connection, PostgresConnection, SqliteConnection
from consumers.storage.migrations import APPLIED, schema
from consumers.storage.rows import NAMES, StoredReport, caller, newest_per_call
from consumers.storage.settings import BackendName, StorageSettings
from consumers.storage.statements import Script, Statement, one
from consumers.storage.timeline import StoredStatus
from schemas.events import StatusUpdate

# Rows per page for iter_records: large enough to stream fast, small enough that no
# connection or transaction stays open while the caller works through a page.
_PAGE_SIZE: Final = 1000
# Keyset pages: the first includes `since` itself, later ones start after the last row.
_FIRST_PAGE: Final = (
    "SELECT event_time, call_id, record FROM call_reports"
    " WHERE (event_time, call_id) >= (?, ?) AND event_time < ?"
    " ORDER BY event_time, call_id LIMIT ?"
)
_NEXT_PAGE: Final = _FIRST_PAGE.replace(">=", ">")
# asyncpg gives jsonb as its JSON text, as SQLite gives its TEXT columns.
_FETCH: Final = f"SELECT {', '.join(NAMES)} FROM call_reports WHERE call_id = ?"  # noqa: S608
# The caller's number is from_number in every format (FLAT fromCaller, nested
# customer.number); to_number is the assistant's line, shared by every caller, so matching
# it would erase other people's calls. Both given: rows matching both, the narrower reading
# of an erasure request. A call's status updates go with it: those that carry the number
# themselves, and those of the calls whose report does (deleted first, while the report
# that names the caller is still there).
_ERASE_REPORTS: Final = "DELETE FROM call_reports WHERE from_number = ?"
_ERASE_CALL_REPORT: Final = "DELETE FROM call_reports WHERE call_id = ?"
_ERASE_EVENTS: Final = (
    "DELETE FROM call_events WHERE (from_number = ?"
    " OR call_id IN (SELECT call_id FROM call_reports WHERE from_number = ?))"
)
_ERASE_CALL_EVENTS: Final = "DELETE FROM call_events WHERE call_id = ?"
_PURGE: Final = (
    "DELETE FROM call_reports WHERE event_time < ?",
    "DELETE FROM call_events WHERE event_time < ?",
)


@dataclass(frozen=True, slots=True)
class Written:
    rows: int  # inserted or changed
    erased: int  # not stored: an erasure covers them (consumers.storage.erasures)


@dataclass(frozen=True, slots=True)
class EventsWritten:
    rows: int  # status updates stored
    erased: int  # status updates an erasure covers
    ignored: int  # other event types, and status updates that name no call


def _aware(moment: datetime, what: str) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"{what} must be timezone-aware")
    return moment


class StorageBackend:
    """Where reports are kept. `open` connects and migrates; every other method opens
    on demand, so a database that was down at start-up is picked up once it is back."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.name: BackendName = connection.dialect.name
        self._dialect = connection.dialect
        self._erased = erasures.Erased(self._dialect.text)

    async def open(self) -> None:
        """Connect and apply pending migrations; RetryableError while that cannot happen."""
        await self.connection.open()

    async def close(self) -> None:
        await self.connection.close()

    async def write(self, batch: Sequence[Delivery], stored_at: datetime) -> Written:
        """Upsert the newest version of each call in one transaction, leaving out the
        calls an erasure covers. Reports that were already stored, or older than the
        stored version, change nothing and count in neither figure."""
        if not batch:
            return Written(0, 0)
        return await self.connection.run(self._upsert(batch, stored_at), transaction=True)

    def _upsert(self, batch: Sequence[Delivery], stored_at: datetime) -> Script[Written]:
        yield from erasures.read_log(self._dialect, self._erased)
        covers = self._erased.covers_call
        kept = [d for d in batch if not covers(*caller(d))]
        newest = newest_per_call(kept, self._dialect.text)
        # A replay, or a redelivery after a rebalance, brings versions already stored:
        # asking first costs one indexed lookup per call and spares building, sending and
        # conflict-checking rows that the upsert would leave alone anyway.
        versions = self._dialect.versions(newest)
        held = (yield from self._dialect.held(versions)) if newest else set()
        fresh = [(d, v) for d, v in zip(newest, versions, strict=True) if v[0] not in held]
        rows = self._dialect.rows_of([d for d, _ in fresh], [v for _, v in fresh])
        written = (yield self._dialect.upsert(rows, stored_at)).count if rows else 0
        return Written(written, len(batch) - len(kept))

    async def write_events(
        self, batch: Sequence[EventDelivery], stored_at: datetime
    ) -> EventsWritten:
        """Add the status updates in `batch` to their calls' timelines in one transaction,
        leaving out those an erasure covers. One already stored (a redelivery, a replay)
        changes nothing and counts in no figure."""
        updates = timeline.status_updates(batch)
        ignored = len(batch) - len(updates)
        if not updates:
            return EventsWritten(0, 0, ignored)
        script = self._insert_events(updates, stored_at, ignored)
        return await self.connection.run(script, transaction=True)

    def _insert_events(
        self,
        updates: Sequence[tuple[EventDelivery, StatusUpdate]],
        stored_at: datetime,
        ignored: int,
    ) -> Script[EventsWritten]:
        yield from erasures.read_log(self._dialect, self._erased)
        covers = self._erased.covers_call
        kept = [(d, u) for d, u in updates if not covers(u.call_id, u.from_number)]
        rows = timeline.rows(self._dialect, kept)
        written = (yield timeline.insert(self._dialect, rows, stored_at)).count if rows else 0
        return EventsWritten(written, len(updates) - len(kept), ignored)

    async def timeline(self, call_id: str) -> list[StoredStatus]:
        """The status updates of `call_id`, oldest first."""
        rows = await self._query(timeline.QUERY, self._dialect.text(call_id))
        return [timeline.stored(self._dialect, row) for row in rows]

    async def fetch(self, call_id: str) -> StoredReport | None:
        rows = await self._query(_FETCH, self._dialect.text(call_id))
        return self._dialect.stored(rows[0]) if rows else None

    async def count(self) -> int:
        return int((await self._query("SELECT count(*) FROM call_reports"))[0][0])

    async def erase(self, phone: str | None, call_id: str | None) -> int:
        """Delete the calls from `phone` and/or with `call_id`, reports and status updates;
        how many rows went (of both)."""
        text = self._dialect.text
        if phone is not None and call_id is not None:
            statements = [
                (f"{_ERASE_EVENTS} AND call_id = ?", text(phone), text(phone), text(call_id)),
                (f"{_ERASE_REPORTS} AND call_id = ?", text(phone), text(call_id)),
            ]
        elif phone is not None:
            statements = [(_ERASE_EVENTS, text(phone), text(phone)), (_ERASE_REPORTS, text(phone))]
        elif call_id is not None:
            statements = [(_ERASE_CALL_EVENTS, text(call_id)), (_ERASE_CALL_REPORT, text(call_id))]
        else:
            raise ValueError("erase needs a phone number, a call id, or both")
        return await self._delete(*(self._dialect.statement(*s) for s in statements))

    async def purge_older_than(self, age: timedelta) -> int:
        """Delete calls whose event_time is more than `age` ago; how many rows went."""
        if age <= timedelta(0):
            # A zero or negative age would delete every call, which is never what retention means.
            raise ValueError(f"retention age must be positive, not {age}")
        cutoff = self._dialect.time(datetime.now(UTC) - age)
        return await self._delete(*(self._dialect.statement(sql, cutoff) for sql in _PURGE))

    async def iter_records(
        self, since: datetime, until: datetime | None = None
    ) -> AsyncIterator[tuple[str, bytes]]:
        """(call_id, record) with since <= event_time < until, oldest first, page by page.

        Keyset pages rather than a server-side cursor: a cursor needs a transaction held
        open for as long as the caller takes to republish everything."""
        time = self._dialect.time
        end = time(datetime.max.replace(tzinfo=UTC) if until is None else _aware(until, "until"))
        sql, key = _FIRST_PAGE, (time(_aware(since, "since")), "")
        while True:
            rows = await self._query(sql, *key, end, _PAGE_SIZE)
            for _, call_id, record in rows:
                yield call_id, bytes(record)
            if len(rows) < _PAGE_SIZE:
                return
            sql, key = _NEXT_PAGE, (rows[-1][0], rows[-1][1])

    async def applied_migrations(self) -> list[int]:
        return [int(version) for (version,) in await self._query(APPLIED)]

    async def _query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        statement = self._dialect.statement(sql, *params, returns_rows=True)
        return (await self.connection.run(one(statement))).rows

    async def _delete(self, *statements: Statement) -> int:
        return await self.connection.run(_deleting(statements), transaction=True)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _deleting(statements: Sequence[Statement]) -> Script[int]:
    deleted = 0
    for statement in statements:
        deleted += (yield statement).count
    return deleted


def open_backend(settings: StorageSettings) -> StorageBackend:
    """The backend `settings` name, not yet connected (use `async with` or `open()`)."""
    if settings.database_url is not None:
        return StorageBackend(PostgresConnection(settings.database_url.reveal(), schema))
    return StorageBackend(SqliteConnection(settings.sqlite_path, schema))
