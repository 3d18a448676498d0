"""Where the storage consumer keeps its reports, from the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from core.secret import Secret
from core.settings import EnvSettings, SettingsError, setting, settings_class

BackendName = Literal["sqlite", "postgresql"]

DEFAULT_SQLITE_PATH = Path(".callstream/callstream.db")
_POSTGRES_SCHEMES = frozenset({"postgresql", "postgres"})


@settings_class
class StorageSettings(EnvSettings):
    # A Secret because the URL usually carries the password.
    database_url: Secret | None = setting(
        "CALLSTREAM_DATABASE_URL",
        default=None,
        secret=True,
        doc="PostgreSQL URL, postgresql://user:password@host:5432/db. Empty: SQLite (next line).",
    )
    sqlite_path: Path = setting(
        "CALLSTREAM_SQLITE_PATH",
        default=DEFAULT_SQLITE_PATH,
        doc="SQLite file used when CALLSTREAM_DATABASE_URL is empty.",
    )

    def __post_init__(self) -> None:
        url = self.database_url
        if url is not None and urlsplit(url.reveal()).scheme not in _POSTGRES_SCHEMES:
            # The value itself is not repeated: it may hold a password.
            raise SettingsError("CALLSTREAM_DATABASE_URL must be a postgresql:// URL")

    @property
    def backend(self) -> BackendName:
        return "postgresql" if self.database_url is not None else "sqlite"
