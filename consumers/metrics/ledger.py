"""The metrics consumer's ledger: the call ids it has counted, ever."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from consumers import sqlite_file
from consumers.errors import RetryableError
from consumers.sqlite_file import SqliteThread
from schemas.report import CallReport

LEDGER_VERSION = 1


_LEDGER_DDL: Final = """
CREATE TABLE IF NOT EXISTS counted (
    call_id TEXT PRIMARY KEY,
    event_time_ms INTEGER NOT NULL,  -- the two times let a later clean-up prune by age
    counted_at_ms INTEGER NOT NULL   -- without reading the topic again
) WITHOUT ROWID;
"""


class Ledger:
    """Call ids already counted, in a file of its own (consumers.sqlite_file): a committed
    claim survives power loss, so a replay after it is never counted a second time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = SqliteThread("callstream-metrics-ledger", self._connect, self._unavailable)

    def _connect(self) -> sqlite3.Connection:
        return sqlite_file.connect_laid_out(
            self.path,
            busy_timeout=5.0,
            version=LEDGER_VERSION,
            ddl=_LEDGER_DDL,
            what=f"ledger {self.path}",
        )

    def _unavailable(self, exc: Exception) -> Exception:
        return RetryableError(f"metrics ledger {self.path} unavailable: {exc}")

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    async def claim(self, reports: Sequence[CallReport]) -> set[str]:
        """Record the calls not counted before, in one transaction; return their ids."""
        now_ms = time.time_ns() // 1_000_000

        def insert(conn: sqlite3.Connection) -> set[str]:
            claimed: set[str] = set()
            with sqlite_file.transaction(conn):
                for report in reports:
                    cursor = conn.execute(
                        "INSERT INTO counted (call_id, event_time_ms, counted_at_ms)"
                        " VALUES (?, ?, ?) ON CONFLICT (call_id) DO NOTHING",
                        (report.call_id, int(report.event_time.timestamp() * 1000), now_ms),
                    )
                    if cursor.rowcount == 1:
                        claimed.add(report.call_id)
            return claimed

        return await self._db.run(insert)
