"""The storage consumer: every call's newest report in SQLite or PostgreSQL."""

# `X as X`: re-exported, for callers to import from `consumers.storage`.
from consumers.storage.backend import StorageBackend as StorageBackend
from consumers.storage.backend import open_backend as open_backend
from consumers.storage.connections import classify_postgres as classify_postgres
from consumers.storage.consumer import StorageConsumer as StorageConsumer
from consumers.storage.consumer import build as build
from consumers.storage.erasures import ErasureKind as ErasureKind
from consumers.storage.erasures import ErasureLog as ErasureLog
from consumers.storage.erasures import erasure_log as erasure_log
from consumers.storage.erasures import sha256_hex as sha256_hex
from consumers.storage.migrations import POSTGRES_MIGRATIONS as POSTGRES_MIGRATIONS
from consumers.storage.migrations import SQLITE_MIGRATIONS as SQLITE_MIGRATIONS
from consumers.storage.settings import DEFAULT_SQLITE_PATH as DEFAULT_SQLITE_PATH
from consumers.storage.settings import StorageSettings as StorageSettings
