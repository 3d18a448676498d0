"""The throwaway PostgreSQL harness itself: lifecycle, durability across restarts and
crashes, and per-test databases. Everything here talks to a real server."""

from __future__ import annotations

import os
import pwd
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest

from callstream import localpg as pg
from callstream.localpg import PostgresNotFoundError, PostgresServer


@asynccontextmanager
async def connect(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        yield conn
    finally:
        if not conn.is_closed():
            # A connection whose backend died cannot say goodbye politely.
            try:
                await conn.close(timeout=5)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                conn.terminate()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PostgresServer]:
    """A cluster of its own, for tests that stop, restart or kill it."""
    srv = PostgresServer(tmp_path / "pg")
    srv.start()
    try:
        yield srv
    finally:
        if srv.running:
            srv.stop()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    srv = PostgresServer(tmp_path_factory.mktemp("pg-shared"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


async def test_server_runs_with_production_durability_on_loopback(
    server: PostgresServer,
) -> None:
    async with connect(server.dsn) as conn:
        settings = {
            name: await conn.fetchval(f"SHOW {name}")
            for name in ("fsync", "synchronous_commit", "full_page_writes", "listen_addresses")
        }
        assert await conn.fetchval("SELECT current_user") == "postgres"
        assert await conn.fetchval("SELECT inet_server_addr()::text") == "127.0.0.1/32"
    assert settings == {
        "fsync": "on",
        "synchronous_commit": "on",
        "full_page_writes": "on",
        "listen_addresses": "127.0.0.1",
    }
    assert server.dsn == f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
    # The unix socket lives inside base_dir, so clusters never collide in /var/run.
    assert (server.socket_dir / f".s.PGSQL.{server.port}").is_socket()


def test_server_processes_run_as_postgres_user_when_root(server: PostgresServer) -> None:
    assert server.pid is not None
    status = Path(f"/proc/{server.pid}/status").read_text()
    real_uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    # PostgreSQL refuses to run as root, so root hands the server to the postgres user.
    expected = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert int(real_uid) == expected
    assert server.data_dir.stat().st_uid == expected


def test_auto_port_taken_before_first_start_is_replaced(tmp_path: Path) -> None:
    srv = PostgresServer(tmp_path / "pg")
    taken = srv.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        srv.start()
        try:
            assert srv.port != taken
            assert f":{srv.port}/" in srv.dsn
        finally:
            srv.stop()


def test_explicit_port_in_use_is_an_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        srv = PostgresServer(tmp_path / "pg", port=port)
        with pytest.raises(pg.PostgresServerError, match="Address already in use"):
            srv.start()
        assert not srv.running


async def test_committed_row_survives_restart_on_same_port(server: PostgresServer) -> None:
    dsn_before = server.dsn
    pid_before = server.pid
    async with connect(server.dsn) as conn:
        await conn.execute("CREATE TABLE calls (id text PRIMARY KEY, seconds int NOT NULL)")
        await conn.execute("INSERT INTO calls VALUES ('call-1', 42)")

    server.restart()

    assert server.dsn == dsn_before
    assert server.pid != pid_before
    async with connect(server.dsn) as conn:
        rows = await conn.fetch("SELECT id, seconds FROM calls")
    assert [tuple(r) for r in rows] == [("call-1", 42)]
    # A clean shutdown leaves nothing to recover.
    assert "automatic recovery in progress" not in server.log_text()


async def test_kill_drops_clients_and_start_recovers_committed_rows(
    server: PostgresServer,
) -> None:
    async with connect(server.dsn) as conn:
        await conn.execute("CREATE TABLE calls (id text PRIMARY KEY)")
        # Committed after the last checkpoint, so only WAL replay can bring it back.
        await conn.execute("INSERT INTO calls VALUES ('before-crash')")

        server.kill()

        assert not server.running
        assert server.pid is None
        with pytest.raises(asyncpg.ConnectionDoesNotExistError, match="postmaster exit"):
            await conn.fetchval("SELECT 1")

    server.start()

    assert "automatic recovery in progress" in server.log_text()
    async with connect(server.dsn) as conn:
        assert await conn.fetchval("SELECT array_agg(id) FROM calls") == ["before-crash"]
        await conn.execute("INSERT INTO calls VALUES ('after-crash')")
        assert await conn.fetchval("SELECT count(*) FROM calls") == 2


async def test_immediate_stop_then_start_recovers(server: PostgresServer) -> None:
    async with connect(server.dsn) as conn:
        await conn.execute("CREATE TABLE t (x int)")
        await conn.execute("INSERT INTO t VALUES (1)")
    server.stop("immediate")
    assert not server.running
    server.start()
    async with connect(server.dsn) as conn:
        assert await conn.fetchval("SELECT x FROM t") == 1


def test_lifecycle_misuse_is_reported(server: PostgresServer) -> None:
    with pytest.raises(pg.PostgresServerError, match="already running"):
        server.start()
    server.stop()
    server.stop()  # stopping a stopped server is a no-op, so teardowns can be blunt
    with pytest.raises(pg.PostgresServerError, match="not running"):
        server.kill()
    with pytest.raises(pg.PostgresServerError, match="not running"):
        server.create_database("nope")


async def test_create_database_gives_isolated_databases(shared_server: PostgresServer) -> None:
    dsn_a = shared_server.create_database("iso_a")
    dsn_b = shared_server.create_database("iso_b")
    assert dsn_a == f"postgresql://postgres@127.0.0.1:{shared_server.port}/iso_a"

    async with connect(dsn_a) as a, connect(dsn_b) as b:
        assert await a.fetchval("SELECT current_database()") == "iso_a"
        assert await b.fetchval("SELECT current_database()") == "iso_b"
        await a.execute("CREATE TABLE calls (id text)")
        await a.execute("INSERT INTO calls VALUES ('only-in-a')")
        assert await b.fetchval("SELECT to_regclass('calls')") is None
        # The same name in b is a different table.
        await b.execute("CREATE TABLE calls (id text)")
        assert await b.fetchval("SELECT count(*) FROM calls") == 0
        assert await a.fetchval("SELECT count(*) FROM calls") == 1


async def test_create_database_quotes_awkward_names(shared_server: PostgresServer) -> None:
    name = 'Calls "2024"; DROP'
    dsn = shared_server.create_database(name)
    async with connect(dsn) as conn:
        assert await conn.fetchval("SELECT current_database()") == name


def test_create_database_rejects_duplicates_and_bad_names(shared_server: PostgresServer) -> None:
    shared_server.create_database("dup")
    with pytest.raises(pg.PostgresServerError, match="already exists"):
        shared_server.create_database("dup")
    with pytest.raises(ValueError, match="bytes"):
        shared_server.create_database("x" * 64)
    with pytest.raises(ValueError, match="bytes"):
        shared_server.create_database("")


def test_missing_postgres_fails_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a server installed the harness raises; it must never turn into a skip."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no pg_config
    monkeypatch.setattr(pg, "_DEBIAN_ROOT", tmp_path / "nowhere")
    pg.find_bindir.cache_clear()
    try:
        with pytest.raises(PostgresNotFoundError, match="install-system-deps"):
            PostgresServer(tmp_path / "pg").start()
    finally:
        pg.find_bindir.cache_clear()
    assert not (tmp_path / "pg" / "data").exists()


@pytest.mark.parametrize("stage", ["_initdb", "_launch"])
def test_start_survives_a_concurrent_pytest_retightening_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """Another pytest session as the same user chmods /tmp/pytest-of-<user> back to 0700
    at any moment; as root that locks the postgres user out in the middle of a start."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    original = getattr(PostgresServer, stage)
    calls = 0

    def retighten_first(self: PostgresServer, *args: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            locked.chmod(0o700)
        original(self, *args)

    monkeypatch.setattr(PostgresServer, stage, retighten_first)
    srv = PostgresServer(locked / "pg")
    srv.start()
    try:
        assert srv.running
        if os.geteuid() == 0:
            # At least one retry; more when a real concurrent session interferes too.
            assert calls >= 2
    finally:
        srv.stop()
