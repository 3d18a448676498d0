"""Every consumer callstream runs. Adding one: write its file, add one line here."""

from __future__ import annotations

from consumers import alerting, metrics
from consumers.contract import ConsumerSpec

CONSUMERS: dict[str, ConsumerSpec] = {
    "alerting": ConsumerSpec(alerting.build, 9102, "notifications from YAML rules"),
    "metrics": ConsumerSpec(metrics.build, 9103, "business metrics, counted once per call"),
}
