"""`python -m callstream.bench.pgwrite`'s two ways of writing a batch to PostgreSQL store the
same rows, so what it measures is a choice between equals."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg

from callstream.bench.pgwrite import measure, write_copy, write_unnest
from callstream.bench.storagepath import deliveries, sample_records
from callstream.localpg import PostgresServer
from consumers.storage.dialects import POSTGRES
from schemas.codec import Decoder
from schemas.store import default_store
from tests.support.storage import fresh_database

STORED_AT = datetime(2026, 12, 7, 20, 0, tzinfo=UTC)


def rows(count: int) -> list[tuple[Any, ...]]:
    return POSTGRES.rows(deliveries(Decoder(default_store()), sample_records(count), 0))


async def table(conn: asyncpg.Connection[Any]) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await conn.fetch("SELECT * FROM call_reports ORDER BY call_id")]


async def test_copy_and_unnest_store_the_same_rows_and_both_keep_a_newer_version(
    postgres: PostgresServer,
) -> None:
    dsn = fresh_database(postgres)
    batch = rows(40)
    [[rate, _]] = (await measure(dsn, [batch], rounds=1))["COPY"]  # lays the tables out too
    assert rate > 0
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE call_reports")
        await write_unnest(conn, batch, STORED_AT)
        by_unnest = await table(conn)
        await conn.execute("TRUNCATE call_reports")
        await conn.execute(
            "CREATE TEMP TABLE callstream_staging (LIKE call_reports INCLUDING DEFAULTS)"
            " ON COMMIT DELETE ROWS"
        )
        await write_copy(conn, batch, STORED_AT)
        by_copy = await table(conn)
        # The same rows again, a day later: neither way overwrites a version it already has.
        await write_copy(conn, batch, STORED_AT.replace(day=8))
        again = await table(conn)
    finally:
        await conn.close()
    assert len(by_copy) == 40
    assert by_copy == by_unnest
    assert again == by_copy
