"""Metrics every consumer service exports about its own consumption."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# From "a few ms after the call ended" up to replays of last month's calls.
DELAY_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    3600.0,
    86400.0,
)


class RunnerMetrics:
    def __init__(self, registry: CollectorRegistry, consumer: str) -> None:
        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, ["consumer"], registry=registry)

        self.consumed = counter(
            "callstream_consumer_records_consumed_total", "Records fetched from the topic."
        ).labels(consumer)
        self.handled = counter(
            "callstream_consumer_records_handled_total", "Records the handler completed."
        ).labels(consumer)
        self.skipped = counter(
            "callstream_consumer_records_skipped_total",
            "Records re-driven from the dead-letter topic for another consumer, passed over.",
        ).labels(consumer)
        self.failed = counter(
            "callstream_consumer_records_failed_total",
            "Handler attempts that failed (each retry counts).",
        ).labels(consumer)
        self.dead_lettered = counter(
            "callstream_consumer_records_dead_lettered_total",
            "Records sent to the dead-letter topic.",
        ).labels(consumer)
        self.batch_duration = Histogram(
            "callstream_consumer_batch_duration_seconds",
            "Time to handle and commit one batch.",
            ["consumer"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        ).labels(consumer)
        self.end_to_end_delay = Histogram(
            "callstream_consumer_end_to_end_delay_seconds",
            "Now minus the report's event time, when the handler finished with it.",
            ["consumer"],
            buckets=DELAY_BUCKETS,
            registry=registry,
        ).labels(consumer)
        self.lag = Gauge(
            "callstream_consumer_lag",
            "Records between the committed offset and the high watermark.",
            ["consumer", "partition"],
            registry=registry,
        )
        self.last_commit = Gauge(
            "callstream_consumer_last_commit_timestamp_seconds",
            "Unix time of the last successful offset commit.",
            ["consumer"],
            registry=registry,
        ).labels(consumer)
        self.retrying = Gauge(
            "callstream_consumer_retrying",
            "1 while the handler is backing off from a retryable error.",
            ["consumer"],
            registry=registry,
        ).labels(consumer)
        self.consumer = consumer
