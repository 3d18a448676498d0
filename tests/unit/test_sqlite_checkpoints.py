"""Storage's SQLite WAL is checkpointed by a connection of its own: the database file takes
the writer's pages while the writer is nowhere near its own checkpoint threshold, so no
COMMIT of the consumer ever pays for a checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from consumers.storage.connections import SqliteConnection
from consumers.storage.dialects import Dialect
from consumers.storage.statements import Script, Statement
from tests.support.runner import eventually

ROWS = 2_000
ROW_BYTES = 2_000  # 4 MB in all: far below the writer's own threshold


def no_schema(dialect: Dialect) -> list[Script[None]]:
    return []


def write(first: int) -> Script[None]:
    yield Statement("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, v BLOB)")
    rows = tuple((n, os.urandom(ROW_BYTES)) for n in range(first, first + 200))
    yield Statement("INSERT INTO t VALUES (?, ?)", rows, many=True)


async def test_the_database_file_takes_the_wal_without_the_writer_checkpointing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "storage.db"
    conn = SqliteConnection(path, no_schema)
    await conn.open()
    try:
        for first in range(0, ROWS, 200):
            await conn.run(write(first), transaction=True)
        await eventually(lambda: path.stat().st_size >= ROWS * ROW_BYTES, timeout=20)
    finally:
        await conn.close()
