"""The storage consumer: every call's newest report in SQLite or PostgreSQL."""

from consumers.storage.backend import (
    POSTGRES_MIGRATIONS,
    SQLITE_MIGRATIONS,
    SqliteBackend,
    StorageBackend,
    StoredReport,
    classify_postgres,
)
from consumers.storage.consumer import StorageConsumer, StorageMetrics, build, open_backend
from consumers.storage.erasures import (
    DDL_LOCK_KEY,
    POSTGRES_DDL,
    SQLITE_DDL,
    WRITE_FENCE_KEY,
    sha256_hex,
)
from consumers.storage.settings import DEFAULT_SQLITE_PATH, StorageSettings

__all__ = [
    "DDL_LOCK_KEY",
    "DEFAULT_SQLITE_PATH",
    "POSTGRES_DDL",
    "POSTGRES_MIGRATIONS",
    "SQLITE_DDL",
    "SQLITE_MIGRATIONS",
    "WRITE_FENCE_KEY",
    "SqliteBackend",
    "StorageBackend",
    "StorageConsumer",
    "StorageMetrics",
    "StorageSettings",
    "StoredReport",
    "build",
    "classify_postgres",
    "open_backend",
    "sha256_hex",
]
