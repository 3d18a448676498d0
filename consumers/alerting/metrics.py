"""The alerting consumer's own Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from consumers.alerting.channel_config import CHANNEL_TYPES


class AlertMetrics:
    """Labels are channel types and bounded reasons only: never a number, a call or a rule."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.sent = Counter(
            "callstream_alerts_sent",
            "Alerts delivered, by channel type.",
            ["channel_type"],
            registry=registry,
        )
        self.failed = Counter(
            "callstream_alerts_failed",
            "Failed delivery attempts (retried or not), by channel type and reason.",
            ["channel_type", "reason"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            "callstream_alerts_dead_lettered",
            "Alerts given up on and written to alert_dead_letters, by channel type.",
            ["channel_type"],
            registry=registry,
        )
        self.suppressed_duplicates = Counter(
            "callstream_alerts_suppressed_duplicates",
            "Alerts not sent because that (rule, call, channel) was already handled.",
            registry=registry,
        )
        self.send_duration = Histogram(
            "callstream_alert_send_duration_seconds",
            "Duration of one delivery attempt, by channel type.",
            ["channel_type"],
            registry=registry,
        )
        for channel_type in CHANNEL_TYPES:
            self.sent.labels(channel_type)
            self.dead_lettered.labels(channel_type)
