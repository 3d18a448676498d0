"""PostgreSQL's write of a catch-up batch, two ways on the same rows:

* **unnest**, as storage ships it: one statement per batch, each column one array
  parameter, `INSERT ... SELECT FROM unnest(...) ON CONFLICT ... DO UPDATE ... WHERE newer`;
* **COPY**: the batch copied (binary) into a temporary staging table, then one
  `INSERT ... SELECT FROM staging` with the same conflict clause, in one transaction.

Each round truncates the table, writes every batch one way, then again the other way, so
both see the same table size and the same indexes. Records/s is the wall-clock rate of the
writes alone (rows are built beforehand); the client's CPU per record is `time.process_time`.
It starts a throwaway PostgreSQL server (scripts/install-system-deps installs the binaries).

Run as ``python -m callstream.bench.pgwrite [--records N] [--rounds R]``
(docs/performance.md, "PostgreSQL: COPY or unnest").
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry

from callstream.bench.storagepath import deliveries, sample_records
from callstream.localpg import PostgresServer
from consumers.storage.consumer import build
from consumers.storage.dialects import POSTGRES
from consumers.storage.rows import NAMES
from schemas.codec import Decoder
from schemas.store import default_store

_BATCH = 500
_STAGING = "callstream_staging"

Rows = Sequence[tuple[Any, ...]]
Write = Callable[["asyncpg.Connection[Any]", Rows, datetime], Awaitable[None]]


async def write_unnest(conn: asyncpg.Connection[Any], rows: Rows, stored_at: datetime) -> None:
    statement = POSTGRES.upsert(rows, stored_at)
    async with conn.transaction():
        await conn.execute(statement.sql, *statement.params)


async def write_copy(conn: asyncpg.Connection[Any], rows: Rows, stored_at: datetime) -> None:
    async with conn.transaction():
        await conn.copy_records_to_table(
            _STAGING, records=[(*row, stored_at) for row in rows], columns=list(NAMES)
        )
        await conn.execute(POSTGRES.upsert_from(_STAGING))


async def measure(
    dsn: str, batches: Sequence[Rows], rounds: int
) -> dict[str, list[tuple[float, float]]]:
    """(records/s, client CPU µs per record) of each way, per round."""
    # The storage consumer's own start-up lays the tables out, migrations and all.
    consumer = build({"CALLSTREAM_DATABASE_URL": dsn}, CollectorRegistry())
    await consumer.start()
    await consumer.stop()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            f"CREATE TEMP TABLE {_STAGING} (LIKE call_reports INCLUDING DEFAULTS)"
            " ON COMMIT DELETE ROWS"
        )
        ways: dict[str, Write] = {"unnest": write_unnest, "COPY": write_copy}
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
        count = sum(len(rows) for rows in batches)
        for _ in range(rounds):
            for name, write in ways.items():
                await conn.execute("TRUNCATE call_reports")
                await conn.execute("CHECKPOINT")
                wall, cpu = time.perf_counter(), time.process_time()
                for rows in batches:
                    await write(conn, rows, datetime.now(UTC))
                elapsed = time.perf_counter() - wall
                stored = await conn.fetchval("SELECT count(*) FROM call_reports")
                assert stored == count, (name, stored, count)
                results[name].append((count / elapsed, (time.process_time() - cpu) / count * 1e6))
        return results
    finally:
        await conn.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m callstream.bench.pgwrite")
    parser.add_argument("--records", type=int, default=20_000, help="(%(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="(%(default)s)")
    args = parser.parse_args(argv)
    decoder = Decoder(default_store())
    values = sample_records(args.records)
    batches = [
        POSTGRES.rows(deliveries(decoder, values[start : start + _BATCH], start))
        for start in range(0, len(values), _BATCH)
    ]
    with tempfile.TemporaryDirectory(prefix="callstream-pgwrite-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)  # the server runs as the `postgres` user
        server = PostgresServer(base / "pg")
        server.start()
        try:
            dsn = server.create_database("pgwrite")
            results = asyncio.run(measure(dsn, batches, args.rounds))
        finally:
            server.stop()
    print(f"{args.records:,} sample reports in batches of {_BATCH}, {args.rounds} rounds:")
    for name, runs in results.items():
        rates = ", ".join(f"{rate:,.0f}/s" for rate, _ in runs)
        cpu = ", ".join(f"{us:.0f}" for _, us in runs)
        print(f"  {name:7} {rates}  (client CPU µs per record: {cpu})")


if __name__ == "__main__":
    main()
