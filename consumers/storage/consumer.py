"""storage: keep every call's newest report in SQL, for queries, erasure and replays, and
each call's status updates (from the events topic) as its timeline.

SQLite in a local file by default; PostgreSQL when CALLSTREAM_DATABASE_URL is set (see
`consumers.storage.settings`). The backend, its schema and its migrations live beside this
module in `consumers.storage`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Histogram

from consumers.contract import Consumer, Delivery, EventDelivery
from consumers.errors import RetryableError
from consumers.storage.backend import StorageBackend, open_backend
from consumers.storage.settings import BackendName, StorageSettings

log = logging.getLogger(__name__)


class StorageMetrics:
    def __init__(self, registry: CollectorRegistry, backend: BackendName) -> None:
        def counter(name: str, documentation: str) -> Counter:
            return Counter(name, documentation, ("backend",), registry=registry).labels(backend)

        self.rows_written = counter(
            "callstream_storage_rows_written_total", "Reports inserted or updated in storage."
        )
        self.duplicates = counter(
            "callstream_storage_duplicates_total",
            "Reports that changed nothing: already stored, or older than the stored version.",
        )
        self.erased = counter(
            "callstream_storage_erased_skipped_total",
            "Reports not stored because an erasure covers them (a replay or a late copy).",
        )
        self.write_duration = Histogram(
            "callstream_storage_write_duration_seconds",
            "Time to write one batch, transaction included (successful writes only).",
            ("backend",),
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        ).labels(backend)
        self.call_events_written = counter(
            "callstream_storage_call_events_written_total",
            "Status updates added to a call's timeline (call_events).",
        )
        events_skipped = Counter(
            "callstream_storage_events_skipped_total",
            "Records of the events topic not added to a timeline, by reason: another event"
            " type or no call id (ignored), already stored (duplicate), or erased.",
            ("backend", "reason"),
            registry=registry,
        )
        self.events_ignored = events_skipped.labels(backend, "ignored")
        self.events_duplicate = events_skipped.labels(backend, "duplicate")
        self.events_erased = events_skipped.labels(backend, "erased")


class StorageConsumer(Consumer):
    """Upserts each batch in one transaction; a call's newest report wins, so replays
    and redeliveries are harmless."""

    name = "storage"
    reads_events = True

    def __init__(self, backend: StorageBackend, registry: CollectorRegistry) -> None:
        self.backend = backend
        self._metrics = StorageMetrics(registry, backend.name)

    async def start(self) -> None:
        try:
            await self.backend.open()
        except RetryableError as exc:
            # Failing here would turn a database outage into a restart loop; the first
            # batch retries the connection and the migrations instead, and the runner
            # holds the batch (and its offsets) until they succeed.
            log.warning("storage database not ready at start-up: %s", exc)

    async def stop(self) -> None:
        await self.backend.close()

    async def handle(self, batch: Sequence[Delivery]) -> None:
        started = time.perf_counter()
        written = await self.backend.write(batch, stored_at=datetime.now(UTC))
        self._metrics.write_duration.observe(time.perf_counter() - started)
        self._metrics.rows_written.inc(written.rows)
        self._metrics.erased.inc(written.erased)
        # Superseded versions within the batch count here too: they changed nothing.
        self._metrics.duplicates.inc(len(batch) - written.rows - written.erased)

    async def handle_events(self, batch: Sequence[EventDelivery]) -> None:
        written = await self.backend.write_events(batch, stored_at=datetime.now(UTC))
        self._metrics.call_events_written.inc(written.rows)
        self._metrics.events_ignored.inc(written.ignored)
        self._metrics.events_erased.inc(written.erased)
        self._metrics.events_duplicate.inc(
            len(batch) - written.rows - written.erased - written.ignored
        )


def build(env: Mapping[str, str], registry: CollectorRegistry) -> StorageConsumer:
    return StorageConsumer(open_backend(StorageSettings.from_env(env)), registry)
