"""Fixtures shared by the storage tests of this folder (defined in tests/support/storage.py)."""

from tests.support.storage import (  # noqa: F401 - fixtures
    backend_name,
    consumer,
    registry,
    storage_env,
)
