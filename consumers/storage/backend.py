"""The storage backend: what the consumer, `callstream erase` and replays do with stored
reports, written once for SQLite (default, no server) and PostgreSQL: one row per call in
`call_reports`, the newest version of its report by (event_time, received_at).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Self

from consumers.contract import Delivery
from consumers.storage import erasures
from consumers.storage.connections import Connection, PostgresConnection, SqliteConnection
from consumers.storage.migrations import APPLIED, schema
from consumers.storage.rows import NAMES, StoredReport
from consumers.storage.settings import BackendName, StorageSettings
from consumers.storage.statements import Script, one

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
# of an erasure request.
_ERASE: Final = {
    (True, False): "DELETE FROM call_reports WHERE from_number = ?",
    (False, True): "DELETE FROM call_reports WHERE call_id = ?",
    (True, True): "DELETE FROM call_reports WHERE from_number = ? AND call_id = ?",
}


@dataclass(frozen=True, slots=True)
class Written:
    """What one `write` did with its batch."""

    rows: int  # inserted or changed
    erased: int  # not stored: an erasure covers them (consumers.storage.erasures)


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
        self._erased = erasures.Erased()

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
        kept = [d for d in batch if not self._erased.covers(d.report)]
        rows = self._dialect.rows(kept)
        written = (yield self._dialect.upsert(rows, stored_at)).count if rows else 0
        return Written(written, len(batch) - len(kept))

    async def fetch(self, call_id: str) -> StoredReport | None:
        rows = await self._query(_FETCH, self._dialect.text(call_id))
        return self._dialect.stored(rows[0]) if rows else None

    async def count(self) -> int:
        return int((await self._query("SELECT count(*) FROM call_reports"))[0][0])

    async def erase(self, phone: str | None, call_id: str | None) -> int:
        """Delete the calls from `phone` and/or with `call_id`; how many rows went."""
        sql = _ERASE.get((phone is not None, call_id is not None))
        if sql is None:
            raise ValueError("erase needs a phone number, a call id, or both")
        params = [self._dialect.text(v) for v in (phone, call_id) if v is not None]
        return await self._delete(sql, *params)

    async def purge_older_than(self, age: timedelta) -> int:
        """Delete calls whose event_time is more than `age` ago; how many rows went."""
        if age <= timedelta(0):
            # A zero or negative age would delete every call, which is never what retention means.
            raise ValueError(f"retention age must be positive, not {age}")
        cutoff = self._dialect.time(datetime.now(UTC) - age)
        return await self._delete("DELETE FROM call_reports WHERE event_time < ?", cutoff)

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

    async def _delete(self, sql: str, *params: Any) -> int:
        statement = self._dialect.statement(sql, *params)
        return (await self.connection.run(one(statement), transaction=True)).count

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def open_backend(settings: StorageSettings) -> StorageBackend:
    """The backend `settings` name, not yet connected (use `async with` or `open()`)."""
    if settings.database_url is not None:
        return StorageBackend(PostgresConnection(settings.database_url.reveal(), schema))
    return StorageBackend(SqliteConnection(settings.sqlite_path, schema))
