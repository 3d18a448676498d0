"""Every consumer callstream runs. Adding one: write its package, add one line here."""

from __future__ import annotations

from consumers import alerting, metrics, storage
from consumers.contract import ConsumerSpec

CONSUMERS: dict[str, ConsumerSpec] = {
    "storage": ConsumerSpec(
        storage.build, 9101, "one row per call in SQLite or PostgreSQL", storage.StorageSettings
    ),
    "alerting": ConsumerSpec(
        alerting.build, 9102, "notifications from YAML rules", alerting.AlertingSettings
    ),
    "metrics": ConsumerSpec(
        metrics.build, 9103, "business metrics, counted once per call", metrics.MetricsSettings
    ),
}
