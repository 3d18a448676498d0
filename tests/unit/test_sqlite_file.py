"""consumers.sqlite_file: the one way consumers open and use their SQLite files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from consumers import sqlite_file
from consumers.sqlite_file import SqliteThread


class Unavailable(Exception):
    pass


def thread(path: Path) -> SqliteThread:
    def opener() -> sqlite3.Connection:
        conn = sqlite_file.connect(path, busy_timeout=1.0)
        sqlite_file.ensure_layout(conn, 2, "CREATE TABLE IF NOT EXISTS t (v INTEGER);", "test file")
        return conn

    return SqliteThread("test-sqlite", opener, lambda exc: Unavailable(str(exc)))


async def test_a_file_opens_in_wal_with_full_sync_and_its_layout_stamped(tmp_path: Path) -> None:
    db = thread(tmp_path / "nested" / "state.db")
    await db.open()
    settings = await db.run(
        lambda conn: (
            conn.execute("PRAGMA journal_mode").fetchone()[0],
            conn.execute("PRAGMA synchronous").fetchone()[0],
            conn.execute("PRAGMA user_version").fetchone()[0],
        )
    )
    await db.close()
    assert settings == ("wal", 2, 2)  # synchronous 2 = FULL


async def test_a_failed_transaction_is_rolled_back_before_the_next_call(tmp_path: Path) -> None:
    db = thread(tmp_path / "state.db")

    def half_then_fail(conn: sqlite3.Connection) -> None:
        with sqlite_file.transaction(conn):
            conn.execute("INSERT INTO t VALUES (1)")
            conn.execute("INSERT INTO no_such_table VALUES (1)")

    with pytest.raises(Unavailable, match="no_such_table"):
        await db.run(half_then_fail)
    assert await db.run(lambda conn: conn.in_transaction) is False
    assert await db.run(lambda conn: conn.execute("SELECT count(*) FROM t").fetchone()[0]) == 0
    await db.close()


async def test_a_file_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 3")
    db = thread(path)
    with pytest.raises(Unavailable, match="layout v3, newer than this release's v2"):
        await db.open()
    await db.close()


async def test_after_close_calls_fail_as_unavailable_until_opened_again(tmp_path: Path) -> None:
    db = thread(tmp_path / "state.db")
    await db.run(lambda conn: conn.execute("INSERT INTO t VALUES (7)"))
    await db.close()
    with pytest.raises(Unavailable, match="closed"):
        await db.run(lambda conn: None)
    await db.open()
    assert await db.run(lambda conn: conn.execute("SELECT v FROM t").fetchone()[0]) == 7
    await db.close()
