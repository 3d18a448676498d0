"""The storage consumer on each real database, for the tests of tests/integration: the
fixtures (offered to every module there by its conftest.py) and the helpers beside them."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from callstream.localpg import PostgresServer
from consumers.storage import StorageConsumer, build

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def storage_env(
    backend_name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> dict[str, str]:
    if backend_name == "sqlite":
        return {"CALLSTREAM_SQLITE_PATH": str(tmp_path / "state" / "callstream.db")}
    return {"CALLSTREAM_DATABASE_URL": fresh_database(request.getfixturevalue("postgres"))}


def fresh_database(server: PostgresServer) -> str:
    return server.create_database(f"storage_{uuid.uuid4().hex[:16]}")


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@asynccontextmanager
async def running(
    env: Mapping[str, str], registry: CollectorRegistry | None = None
) -> AsyncIterator[StorageConsumer]:
    consumer = build(env, registry or CollectorRegistry())
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


@pytest.fixture
async def consumer(
    storage_env: dict[str, str], registry: CollectorRegistry
) -> AsyncIterator[StorageConsumer]:
    async with running(storage_env, registry) as started:
        yield started


async def raw_row(env: Mapping[str, str], sqlite_sql: str, pg_sql: str, *params: Any) -> Any:
    """One row straight from the database, bypassing the backend's own reading."""
    url = env.get("CALLSTREAM_DATABASE_URL")
    if url is None:
        with closing(sqlite3.connect(env["CALLSTREAM_SQLITE_PATH"])) as lite:
            return lite.execute(sqlite_sql, params).fetchone()
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return tuple(await conn.fetchrow(pg_sql, *params) or ())
    finally:
        await conn.close()
