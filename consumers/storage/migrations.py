"""The storage schema's migrations, one list per database (their types differ), and
applying them once however many instances start."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from consumers.storage import erasures
from consumers.storage.dialects import Dialect
from consumers.storage.settings import BackendName
from consumers.storage.statements import Script, Statement

log = logging.getLogger(__name__)

# An arbitrary constant that only callstream's migrations take (ASCII "callstre").
MIGRATION_LOCK_KEY: Final = 0x63616C6C73747265
# A migration may rebuild an index on a big table; the pool's command timeout is sized
# for batches. Waiting for the lock keeps the pool's timeout, so a stuck peer shows up.
_MIGRATION_TIMEOUT: Final = 3600.0


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
        Migration(
            2,
            "the fields of report schema v3: start and end, cost, agent, transcript turns",
            (
                "ALTER TABLE call_reports ADD COLUMN started_at TEXT",
                "ALTER TABLE call_reports ADD COLUMN ended_at TEXT",
                "ALTER TABLE call_reports ADD COLUMN cost REAL",
                "ALTER TABLE call_reports ADD COLUMN costs TEXT",
                "ALTER TABLE call_reports ADD COLUMN agent_id TEXT",
                "ALTER TABLE call_reports ADD COLUMN agent_name TEXT",
                "ALTER TABLE call_reports ADD COLUMN transcript_turns TEXT",
                "ALTER TABLE call_reports ADD COLUMN event_time_source"
                " TEXT NOT NULL DEFAULT 'sent'",
                "ALTER TABLE call_reports ADD COLUMN derived_fields TEXT",
            ),
        ),
        Migration(
            3,
            "success_evaluation as plain text, and its typed twin success",
            (
                "ALTER TABLE call_reports ADD COLUMN success INTEGER",
                # One UPDATE: every SET reads the row as it was, JSON text. A JSON string
                # loses its quotes; true, false and numbers are already spelt as the new
                # rows spell them (consumers.storage.rows.evaluation_text). The trimmed
                # spaces are the ASCII ones that rows.success_flag trims.
                """
                UPDATE call_reports SET
                    success = CASE json_type(success_evaluation)
                        WHEN 'true' THEN 1
                        WHEN 'false' THEN 0
                        WHEN 'text' THEN CASE lower(trim(json_extract(success_evaluation, '$'),
                                                         ' ' || char(9, 10, 11, 12, 13)))
                            WHEN 'true' THEN 1
                            WHEN 'false' THEN 0
                        END
                    END,
                    success_evaluation = CASE json_type(success_evaluation)
                        WHEN 'text' THEN json_extract(success_evaluation, '$')
                        WHEN 'null' THEN NULL
                        ELSE success_evaluation
                    END
                WHERE success_evaluation IS NOT NULL
                """,
            ),
        ),
        Migration(
            4,
            "call_events: each call's status updates, its timeline",
            (
                # One row per status update as delivered: the request id is the ingress's
                # own for each request (or the sender's X-Request-Id), so a redelivery, a
                # replay or a second publish of one request hits the key and adds nothing.
                """
                CREATE TABLE call_events (
                    call_id TEXT NOT NULL,
                    request_id TEXT NOT NULL,
                    event_type TEXT NOT NULL,
                    event_time TEXT NOT NULL,
                    event_time_source TEXT NOT NULL,
                    received_at TEXT NOT NULL,
                    status TEXT,
                    ended_reason TEXT,
                    error TEXT,
                    from_number TEXT,
                    source_format TEXT NOT NULL,
                    kafka_partition INTEGER NOT NULL,
                    kafka_offset INTEGER NOT NULL,
                    stored_at TEXT NOT NULL,
                    PRIMARY KEY (call_id, request_id)
                )
                """,
                "CREATE INDEX call_events_event_time_idx ON call_events (event_time)",
                "CREATE INDEX call_events_from_number_idx ON call_events (from_number)"
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
        Migration(
            2,
            "the fields of report schema v3: start and end, cost, agent, transcript turns",
            (
                """
                ALTER TABLE call_reports
                    ADD COLUMN started_at timestamptz,
                    ADD COLUMN ended_at timestamptz,
                    ADD COLUMN cost double precision,
                    ADD COLUMN costs jsonb,
                    ADD COLUMN agent_id text,
                    ADD COLUMN agent_name text,
                    ADD COLUMN transcript_turns jsonb,
                    ADD COLUMN event_time_source text NOT NULL DEFAULT 'sent',
                    ADD COLUMN derived_fields jsonb
                """,
            ),
        ),
        Migration(
            3,
            "success_evaluation as plain text, and its typed twin success",
            (
                "ALTER TABLE call_reports ADD COLUMN success boolean",
                # #>> '{}' is a JSON scalar's text: a string without its quotes, true,
                # false and numbers as the new rows spell them.
                r"""
                UPDATE call_reports SET success = CASE
                    WHEN jsonb_typeof(success_evaluation) = 'boolean'
                        THEN (success_evaluation #>> '{}')::boolean
                    WHEN jsonb_typeof(success_evaluation) = 'string'
                        AND lower(btrim(success_evaluation #>> '{}', E' \t\n\r\f\x0b'))
                            IN ('true', 'false')
                        THEN lower(btrim(success_evaluation #>> '{}', E' \t\n\r\f\x0b'))
                            = 'true'
                END
                WHERE success_evaluation IS NOT NULL
                """,
                "ALTER TABLE call_reports ALTER COLUMN success_evaluation TYPE text"
                " USING success_evaluation #>> '{}'",
            ),
        ),
        Migration(
            4,
            "call_events: each call's status updates, its timeline",
            (
                # The key and the indexes as in SQLite's migration 4 (why: there).
                """
                CREATE TABLE call_events (
                    call_id text COLLATE "C" NOT NULL,
                    request_id text NOT NULL,
                    event_type text NOT NULL,
                    event_time timestamptz NOT NULL,
                    event_time_source text NOT NULL,
                    received_at timestamptz NOT NULL,
                    status text,
                    ended_reason text,
                    error text,
                    from_number text,
                    source_format text NOT NULL,
                    kafka_partition integer NOT NULL,
                    kafka_offset bigint NOT NULL,
                    stored_at timestamptz NOT NULL,
                    PRIMARY KEY (call_id, request_id)
                )
                """,
                "CREATE INDEX call_events_event_time_idx ON call_events (event_time)",
                "CREATE INDEX call_events_from_number_idx ON call_events USING hash (from_number)",
            ),
        ),
    )
)


MIGRATIONS: Final[dict[BackendName, tuple[Migration, ...]]] = {
    "sqlite": SQLITE_MIGRATIONS,
    "postgresql": POSTGRES_MIGRATIONS,
}
_BOOKKEEPING: Final[dict[BackendName, str]] = {
    "sqlite": "CREATE TABLE IF NOT EXISTS callstream_schema_migrations ("
    " version INTEGER NOT NULL PRIMARY KEY,"
    " description TEXT NOT NULL,"
    " applied_at TEXT NOT NULL)",
    "postgresql": "CREATE TABLE IF NOT EXISTS callstream_schema_migrations ("
    " version integer PRIMARY KEY,"
    " description text NOT NULL,"
    " applied_at timestamptz NOT NULL DEFAULT now())",
}
APPLIED: Final = "SELECT version FROM callstream_schema_migrations ORDER BY version"


def schema(dialect: Dialect) -> tuple[Script[None], ...]:
    """The scripts that make a database ready, each to run in a transaction of its own."""
    return migrate(dialect), erasures.ensure_log(dialect)


def migrate(dialect: Dialect) -> Script[None]:
    # Taken before even the bookkeeping table exists: two instances starting at once
    # would otherwise race on CREATE TABLE IF NOT EXISTS (a unique violation in pg_type)
    # and on applying the same migration twice. SQLite's BEGIN IMMEDIATE does the same.
    yield from dialect.lock(MIGRATION_LOCK_KEY)
    yield dialect.statement(_BOOKKEEPING[dialect.name])
    applied = {int(v) for (v,) in (yield dialect.statement(APPLIED, returns_rows=True)).rows}
    known = MIGRATIONS[dialect.name]
    for migration in known:
        if migration.version in applied:
            continue
        for sql in migration.statements:
            yield Statement(sql, timeout=_MIGRATION_TIMEOUT)
        yield dialect.statement(
            "INSERT INTO callstream_schema_migrations (version, description, applied_at)"
            " VALUES (?, ?, ?)",
            migration.version,
            migration.description,
            dialect.time(datetime.now(UTC)),
        )
        log.info(
            "applied %s migration %d: %s", dialect.name, migration.version, migration.description
        )
    unknown = sorted(applied - {m.version for m in known})
    if unknown:
        # A newer release migrated this database and was rolled back. Migrations only
        # add, so this release keeps working, but someone should know.
        log.warning("database has migrations this release does not know: %s", unknown)
