"""What SQLite and PostgreSQL spell differently: placeholders, batch inserts (the upsert
among them), column types and values, advisory locks, the id of an inserted row,
compaction. Everything else about storage is written once."""

from __future__ import annotations

import itertools
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from consumers.contract import Delivery
from consumers.errors import PermanentError
from consumers.storage.rows import (
    COLUMNS,
    JSON_TEXT,
    NAMES,
    Kind,
    StoredReport,
    newest_per_call,
    record_of,
    record_row_values,
    row_values,
    version,
)
from consumers.storage.settings import BackendName
from consumers.storage.statements import Script, Statement

_ROW_COLUMNS: Final = COLUMNS[:-1]  # without stored_at, which is bound once per batch
# Where a row holds its version (rows.version): call id, event time, receipt time.
_VERSION_COLUMNS: Final = tuple(NAMES.index(c) for c in ("call_id", "event_time", "received_at"))
_PLACEHOLDER: Final = re.compile(r"\?")

# The WHERE makes the upsert idempotent and order-proof: equal or older versions leave
# the stored row (and its stored_at) alone. Column lists come from COLUMNS, a constant.
_ON_CONFLICT: Final = (
    " ON CONFLICT (call_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in NAMES if c != "call_id")
    + " WHERE (excluded.event_time, excluded.received_at) > (stored.event_time, stored.received_at)"
)
_INSERT: Final = f"INSERT INTO call_reports AS stored ({', '.join(NAMES)})"


def _without_nul(text: str) -> str:
    # PostgreSQL's text and jsonb cannot hold U+0000 at all. Only these column copies
    # change (to U+FFFD, the usual stand-in for an unrepresentable character); the
    # `record` column keeps the report byte for byte, so nothing is lost.
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _json_without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return _without_nul(value)
    if isinstance(value, dict):
        return {_without_nul(k): _json_without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_without_nul(v) for v in value]
    return value


class Dialect(ABC):
    """The conversions here are PostgreSQL's: asyncpg takes and gives Python values."""

    name: BackendName

    def __init__(self) -> None:
        encoders: dict[Kind, Callable[[Any], Any]] = {
            "time": self.time,
            "text": self.text,
            "real": float,
            "json": self.json,
        }
        # Only the columns that need converting: row building is on every batch's path.
        # The version's columns come converted already (see `versions`).
        self._encoders = tuple(
            (i, encoders[k])
            for i, (_, k) in enumerate(_ROW_COLUMNS)
            if k in encoders and i not in _VERSION_COLUMNS
        )
        # A row from the record: its JSON fields are JSON text already.
        self._record_encoders = tuple(
            (i, self.json_text if _ROW_COLUMNS[i][0] in JSON_TEXT else encode)
            for i, encode in self._encoders
        )
        decoders: dict[Kind, Callable[[Any], Any]] = {
            "time": self.read_time,
            "json": orjson.loads,
            "bytes": bytes,
            # SQLite has no boolean type: it gives back the 1 or 0 it was given.
            "bool": bool,
        }
        self._decoders = tuple((c, decoders[k]) for c, k in COLUMNS if k in decoders)
        self._upsert = self.insert("call_reports AS stored", COLUMNS, _ON_CONFLICT)

    @abstractmethod
    def insert(self, table: str, columns: Sequence[tuple[str, Kind]], then: str) -> str:
        """An INSERT of `columns` (stored_at last) into `table` from the rows `bulk` binds,
        followed by `then`."""

    @abstractmethod
    def bulk(self, sql: str, rows: Sequence[tuple[Any, ...]], stored_at: datetime) -> Statement:
        """`sql`, from `insert`, for `rows` (values already converted, stored_at left out)."""

    def upsert(self, rows: Sequence[tuple[Any, ...]], stored_at: datetime) -> Statement:
        return self.bulk(self._upsert, rows, stored_at)

    @abstractmethod
    def held(self, versions: Sequence[tuple[Any, Any, Any]]) -> Script[set[str]]:
        """Which of `versions` (call id, event time, receipt time, converted as the row's
        columns are) the table already holds at that version or a newer one: the upsert
        would leave their rows alone, so their rows need not be built nor sent."""

    @abstractmethod
    def compact(self) -> Script[bool]:
        """Make deleted rows' bytes go away (or at least become reusable); False if the
        database was too busy to finish. Outside a transaction."""

    def insert_id(self, sql: str, *params: Any) -> Script[int]:
        """`sql`, an INSERT of one row into a table with an `id` key, and that row's id."""
        return int(
            (yield self.statement(f"{sql} RETURNING id", *params, returns_rows=True)).rows[0][0]
        )

    def time(self, moment: datetime) -> Any:
        return moment

    def read_time(self, value: Any) -> datetime:
        assert isinstance(value, datetime)
        return value

    def text(self, value: str) -> str:
        return value

    def json(self, value: Any) -> str:
        return orjson.dumps(value).decode()

    def json_text(self, text: str) -> str:
        """A JSON column from JSON text the runner has checked parses (schemas.report)."""
        return text

    def lock(self, key: int, *, shared: bool = False) -> Script[None]:
        """An advisory lock held until the transaction ends; nothing where the transaction
        itself already serialises writers."""
        yield from ()

    def statement(self, sql: str, *params: Any, returns_rows: bool = False) -> Statement:
        """`sql` with this database's placeholders for its `?`s."""
        return Statement(sql, params, returns_rows=returns_rows)

    def rows(self, batch: Sequence[Delivery]) -> list[tuple[Any, ...]]:
        """The rows of the newest delivery of each call, in COLUMNS order without stored_at."""
        newest = newest_per_call(batch, self.text)
        return self.rows_of(newest, self.versions(newest))

    def versions(self, batch: Sequence[Delivery]) -> list[tuple[Any, Any, Any]]:
        """(call id, event time, receipt time) of each delivery, converted as their columns
        are: what `held` and `rows_of` take."""
        try:
            return [(self.text(c), self.time(e), self.time(r)) for c, e, r in map(version, batch)]
        except ValueError as exc:
            raise PermanentError(f"report cannot be stored: {exc}") from exc

    def rows_of(
        self, newest: Sequence[Delivery], versions: Sequence[tuple[Any, Any, Any]]
    ) -> list[tuple[Any, ...]]:
        """The rows of `newest`, one delivery per call (newest_per_call), and their
        `versions`; in COLUMNS order without stored_at."""
        try:
            return [self._row(d, v) for d, v in zip(newest, versions, strict=True)]
        except (TypeError, ValueError) as exc:
            # orjson refuses what JSON cannot hold (integers beyond 64 bits, lone surrogates).
            raise PermanentError(f"report cannot be stored: {type(exc).__name__}: {exc}") from exc

    def _row(self, delivery: Delivery, version: tuple[Any, Any, Any]) -> tuple[Any, ...]:
        record = record_of(delivery)
        if record is not None:
            values, encoders = record_row_values(delivery, record), self._record_encoders
        else:
            values, encoders = row_values(delivery), self._encoders
        for i, encode in encoders:
            # None is SQL NULL (the report has no such field), never JSON null.
            if values[i] is not None:
                values[i] = encode(values[i])
        for i, value in zip(_VERSION_COLUMNS, version, strict=True):
            values[i] = value
        return tuple(values)

    def stored(self, row: Sequence[Any]) -> StoredReport:
        values = dict(zip(NAMES, row, strict=True))
        for name, decode in self._decoders:
            if values[name] is not None:
                values[name] = decode(values[name])
        return StoredReport(**values)


# The negation of _ON_CONFLICT's WHERE: versions the upsert would not write.
_HELD_WHERE: Final = (
    " WHERE (u.event_time, u.received_at) <= (stored.event_time, stored.received_at)"
)
# Rows per statement: three parameters each stay under SQLite's oldest limit of 999.
_SQLITE_HELD_CHUNK: Final = 333


def _sqlite_held(rows: int) -> str:
    values = ", ".join(["(?, ?, ?)"] * rows)
    return (
        f"WITH u(call_id, event_time, received_at) AS (VALUES {values})"  # noqa: S608
        " SELECT u.call_id FROM u JOIN call_reports AS stored ON stored.call_id = u.call_id"
        + _HELD_WHERE
    )


class SqliteDialect(Dialect):
    name: BackendName = "sqlite"

    def time(self, moment: datetime) -> str:
        """Fixed-width ISO-8601 UTC with microseconds, so text order is time order and the
        upsert's newer-than comparison works on the text directly."""
        zone = moment.tzinfo
        if zone is None:
            raise ValueError("naive datetime: every time in callstream is UTC-aware")
        # Decoded records' times are UTC already: astimezone would only copy them.
        utc = moment if zone is UTC else moment.astimezone(UTC)
        return utc.isoformat(timespec="microseconds").removesuffix("+00:00") + "Z"

    def read_time(self, value: Any) -> datetime:
        return datetime.fromisoformat(value)

    def insert(self, table: str, columns: Sequence[tuple[str, Kind]], then: str) -> str:
        names = ", ".join(name for name, _ in columns)
        marks = ", ".join("?" * len(columns))
        return f"INSERT INTO {table} ({names}) VALUES ({marks}){then}"  # noqa: S608

    def bulk(self, sql: str, rows: Sequence[tuple[Any, ...]], stored_at: datetime) -> Statement:
        stamp = self.time(stored_at)
        return Statement(sql, tuple((*row, stamp) for row in rows), many=True)

    def held(self, versions: Sequence[tuple[Any, Any, Any]]) -> Script[set[str]]:
        found: set[str] = set()
        for start in range(0, len(versions), _SQLITE_HELD_CHUNK):
            chunk = versions[start : start + _SQLITE_HELD_CHUNK]
            params = tuple(value for row in chunk for value in row)
            statement = Statement(_sqlite_held(len(chunk)), params, returns_rows=True)
            found.update(call_id for (call_id,) in (yield statement).rows)
        return found

    def insert_id(self, sql: str, *params: Any) -> Script[int]:
        # Not RETURNING, which would need SQLite 3.35.
        yield self.statement(sql, *params)
        return int((yield Statement("SELECT last_insert_rowid()", returns_rows=True)).rows[0][0])

    def compact(self) -> Script[bool]:
        # VACUUM rewrites the file without the freed pages; the checkpoint then moves the
        # rewrite out of the WAL and truncates it, so no old page image survives in either.
        yield Statement("VACUUM")
        busy = (yield Statement("PRAGMA wal_checkpoint(TRUNCATE)", returns_rows=True)).rows[0][0]
        return not busy


_PG_ARRAY_TYPES: Final[dict[Kind, str]] = {
    "time": "timestamptz",
    "real": "float8",
    "bytes": "bytea",
    "int": "int8",
    "bool": "bool",
}

_PG_HELD: Final = (
    "SELECT u.call_id FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[])"  # noqa: S608
    " AS u(call_id, event_time, received_at)"
    " JOIN call_reports AS stored ON stored.call_id = u.call_id" + _HELD_WHERE
)


class PostgresDialect(Dialect):
    name: BackendName = "postgresql"

    def text(self, value: str) -> str:
        return _without_nul(value)

    def json(self, value: Any) -> str:
        text = super().json(value)
        return orjson.dumps(_json_without_nul(value)).decode() if "\\u0000" in text else text

    def json_text(self, text: str) -> str:
        # As `json` does with the value: only a NUL's escape needs the parse.
        return self.json(orjson.loads(text)) if "\\u0000" in text else text

    def statement(self, sql: str, *params: Any, returns_rows: bool = False) -> Statement:
        numbers = itertools.count(1)
        sql = _PLACEHOLDER.sub(lambda _: f"${next(numbers)}", sql)
        return super().statement(sql, *params, returns_rows=returns_rows)

    def lock(self, key: int, *, shared: bool = False) -> Script[None]:
        kind = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
        yield Statement(f"SELECT {kind}($1)", (key,))

    def insert(self, table: str, columns: Sequence[tuple[str, Kind]], then: str) -> str:
        # One statement for the whole batch: each column travels as one array parameter, so
        # the statement is prepared once per connection whatever the batch size, and one
        # round trip writes every row. stored_at, one value, is the last parameter.
        *row_columns, _ = columns
        names = [name for name, _ in columns]
        values = ", ".join(f"u.{c}::jsonb" if k == "json" else f"u.{c}" for c, k in row_columns)
        arrays = ", ".join(
            f"${i}::{_PG_ARRAY_TYPES.get(k, 'text')}[]" for i, (_, k) in enumerate(row_columns, 1)
        )
        return (
            f"INSERT INTO {table} ({', '.join(names)}) SELECT {values}, ${len(columns)}"  # noqa: S608
            f" FROM unnest({arrays}) AS u({', '.join(names[:-1])}){then}"
        )

    def bulk(self, sql: str, rows: Sequence[tuple[Any, ...]], stored_at: datetime) -> Statement:
        columns = [list(column) for column in zip(*rows, strict=True)]
        return Statement(sql, (*columns, stored_at))

    def upsert_from(self, table: str) -> str:
        """The same upsert from the rows of `table` (every column, stored_at included): the
        COPY-then-upsert alternative callstream.bench.pgwrite measures against `upsert`."""
        return f"{_INSERT} SELECT {', '.join(NAMES)} FROM {table}{_ON_CONFLICT}"  # noqa: S608

    def held(self, versions: Sequence[tuple[Any, Any, Any]]) -> Script[set[str]]:
        columns = [list(column) for column in zip(*versions, strict=True)]
        statement = Statement(_PG_HELD, tuple(columns), returns_rows=True)
        return {call_id for (call_id,) in (yield statement).rows}

    def compact(self) -> Script[bool]:
        # Plain VACUUM: the dead rows' space becomes reusable without the exclusive lock
        # VACUUM FULL would hold against the storage consumer.
        yield Statement("VACUUM call_reports, call_events")
        return True


SQLITE: Final = SqliteDialect()
POSTGRES: Final = PostgresDialect()
