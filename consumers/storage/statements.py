"""Database work written once for both databases: a script yields statements and gets
each one's result back. SQLite runs a script synchronously on its connection's thread,
asyncpg awaits each statement; a generator is the one shape of code both can drive
(`consumers.storage.connections` drives them)."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    params: tuple[Any, ...] = ()
    returns_rows: bool = False
    # SQLite only: `params` is a sequence of parameter rows for executemany.
    many: bool = False
    # PostgreSQL only: overrides the pool's command timeout (sized for batches).
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Result:
    rows: list[tuple[Any, ...]]
    count: int  # rows changed, for a statement that changes rows


Script = Generator[Statement, Result, _T]


def one(statement: Statement) -> Script[Result]:
    return (yield statement)
