"""Where the storage consumer keeps its reports, from the environment.

Environment:
    CALLSTREAM_SQLITE_PATH    SQLite file (default .callstream/callstream.db)
    CALLSTREAM_DATABASE_URL   postgresql://user:pass@host:port/db; when set, SQLite is unused
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from core.secret import Secret
from core.settings import SettingsError, env_opt, env_str

BackendName = Literal["sqlite", "postgresql"]

DEFAULT_SQLITE_PATH = Path(".callstream/callstream.db")
_POSTGRES_SCHEMES = frozenset({"postgresql", "postgres"})


@dataclass(frozen=True, slots=True)
class StorageSettings:
    sqlite_path: Path = DEFAULT_SQLITE_PATH
    # A Secret because the URL usually carries the password.
    database_url: Secret | None = None

    @property
    def backend(self) -> BackendName:
        return "postgresql" if self.database_url is not None else "sqlite"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> StorageSettings:
        url = env_opt(env, "CALLSTREAM_DATABASE_URL")
        if url is not None and urlsplit(url).scheme not in _POSTGRES_SCHEMES:
            # The value itself is not repeated: it may hold a password.
            raise SettingsError("CALLSTREAM_DATABASE_URL must be a postgresql:// URL")
        return cls(
            sqlite_path=Path(env_str(env, "CALLSTREAM_SQLITE_PATH", str(DEFAULT_SQLITE_PATH))),
            database_url=None if url is None else Secret(url),
        )
