"""The ingress's Prometheus metrics, built against an injected registry."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.normalise import FIELDS

# Every outcome the handler can reach; children are created up front so the hot path never
# allocates a labelled child, and so each series exists (at 0) from the first scrape.
OUTCOMES = (
    "accepted",
    "answered",  # a request-response event, kept and then answered with its reply
    "replayed",  # a signed request sent again: the first answer again, nothing published
    "unauthorized",
    "invalid-json",
    "invalid-report",
    "unsupported-event",
    "unsupported-encoding",
    "invalid-gzip",
    "body-too-large",
    "body-timeout",
    "body-incomplete",
    "unavailable",
    "not-found",
    "invalid-request",
    "method-not-allowed",
    "internal-error",
    "rate-limited",
    "over-capacity",  # a connection past CALLSTREAM_MAX_CONNECTIONS
    "busy",  # a body past CALLSTREAM_MAX_INFLIGHT_BODY_BYTES
)
# Why a request was quarantined: the problem slugs of the 4xx an authenticated request can
# get after its body was read; anything else counts as "other", so the label stays bounded.
QUARANTINE_REASONS = (
    "invalid-json",
    "invalid-report",
    "unsupported-encoding",
    "invalid-gzip",
    "body-too-large",
    "other",
)
KNOWN_EVENT_TYPES = ("end-of-call-report", "status-update", "other")
# Every series exists from the first scrape, and the hot path never builds a labelled child.
SOURCE_FORMATS: tuple[str, ...] = tuple(FIELDS)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 5.0)
# An fsync on a healthy SSD takes well under a millisecond; seconds mean a sick disk.
FSYNC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Sampled:
    """Gauges whose value is read from the process when scraped.

    In one process set_function does that. With several workers (ingress/workers.py) the
    scrape reads prometheus_client's multiprocess files, which hold only values that were
    set: each worker then calls `refresh` every second and right before it answers a scrape.
    """

    def __init__(self) -> None:
        self._bound: list[tuple[Gauge, Callable[[], float]]] = []
        self._task: asyncio.Task[None] | None = None

    def bind(self, gauge: Gauge, read: Callable[[], float]) -> None:
        gauge.set_function(read)
        self._bound.append((gauge, read))

    def refresh(self) -> None:
        for gauge, read in self._bound:
            gauge.set(read())

    async def start(self, interval: float) -> None:
        self._task = asyncio.create_task(self._refresh_every(interval), name="metrics-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _refresh_every(self, interval: float) -> None:
        while True:
            self.refresh()
            await asyncio.sleep(interval)


class SpoolGauges(Protocol):
    def depth(self) -> int: ...
    def pending_bytes(self) -> int: ...
    def oldest_age_seconds(self) -> float: ...


class SpoolMetrics:
    """The local spool that keeps reports while Kafka does not acknowledge them.

    The gauges are read at scrape time from every spool this process holds (its own, and the
    siblings it is draining, ingress/takeover.py), so they are right even when no request has
    touched a spool for a while. Across workers records and bytes add up; the age is the
    oldest of any live worker's."""

    def __init__(self, registry: CollectorRegistry, sampled: Sampled | None = None) -> None:
        gauge = functools.partial(Gauge, registry=registry)
        counter = functools.partial(Counter, registry=registry)
        histogram = functools.partial(Histogram, registry=registry)
        self._spools: set[SpoolGauges] = set()
        self.records = gauge(
            "callstream_ingress_spool_records",
            "Reports spooled on local disk and not yet on Kafka.",
            multiprocess_mode="livesum",
        )
        self.bytes = gauge(
            "callstream_ingress_spool_bytes",
            "Bytes of spooled reports not yet on Kafka.",
            multiprocess_mode="livesum",
        )
        self.oldest_age = gauge(
            "callstream_ingress_spool_oldest_age_seconds",
            "Age of the oldest spooled report not yet on Kafka (0 when the spool is empty).",
            multiprocess_mode="livemax",
        )
        sampled = sampled or Sampled()
        sampled.bind(self.records, lambda: sum(s.depth() for s in self._spools))
        sampled.bind(self.bytes, lambda: sum(s.pending_bytes() for s in self._spools))
        sampled.bind(
            self.oldest_age, lambda: max((s.oldest_age_seconds() for s in self._spools), default=0)
        )
        self.writes = counter(
            "callstream_ingress_spool_writes_total",
            "Reports written to the spool and fsync'd (each was answered 2xx).",
        )
        self.drained = counter(
            "callstream_ingress_spool_drained_total",
            "Spooled reports acknowledged by Kafka and removed from the spool.",
        )
        self.kafka_ack_missed = counter(
            "callstream_ingress_kafka_ack_missed_total",
            "Reports that waited out the acknowledgement deadline on Kafka (then spooled or"
            " refused); after one, reports skip Kafka until it acknowledges a drained batch.",
        )
        # The deadline decides between Kafka and the spool, so its buckets straddle the
        # default 2 s deadline: a tail creeping towards it is the warning.
        self.kafka_ack_duration = histogram(
            "callstream_ingress_kafka_ack_duration_seconds",
            "Time from handing a report to the producer until Kafka acknowledged it (acks=all);"
            " a report that waited out the deadline is observed at the deadline.",
            buckets=ACK_BUCKETS,
        )
        self.fsync_duration = histogram(
            "callstream_ingress_spool_fsync_duration_seconds",
            "Duration of one group-commit fsync of the spool.",
            buckets=FSYNC_BUCKETS,
        )

    def watch(self, spool: SpoolGauges) -> None:
        self._spools.add(spool)

    def forget(self, spool: SpoolGauges) -> None:
        self._spools.discard(spool)


class IngressMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        gauge = functools.partial(Gauge, registry=registry)
        counter = functools.partial(Counter, registry=registry)
        histogram = functools.partial(Histogram, registry=registry)
        self.sampled = Sampled()
        self.requests = counter(
            "callstream_ingress_requests_total", "Webhook requests by outcome.", ["outcome"]
        )
        self.by_outcome = {outcome: self.requests.labels(outcome) for outcome in OUTCOMES}
        self.events = counter(
            "callstream_ingress_events_total",
            "Accepted events by event type and source format.",
            ["event_type", "source_format"],
        )
        self.by_event = {
            (event_type, source_format): self.events.labels(event_type, source_format)
            for event_type in KNOWN_EVENT_TYPES
            for source_format in SOURCE_FORMATS
        }
        self.request_duration = histogram(
            "callstream_ingress_request_duration_seconds",
            "Time from request start to response, all outcomes.",
            buckets=LATENCY_BUCKETS,
        )
        self.publish_duration = histogram(
            "callstream_ingress_publish_duration_seconds",
            "Time until a report was durable: acknowledged by Kafka (acks=all) "
            "or fsync'd in the local spool.",
            buckets=LATENCY_BUCKETS,
        )
        self.received_bytes = counter(
            "callstream_ingress_received_bytes_total",
            "Request body bytes received, as sent on the wire.",
        )
        self.ready = gauge(
            "callstream_ingress_ready",
            "1 when the ingress can make a report durable, else 0 (with several workers: 1 only"
            " when every live worker can, as any of them may get the next report).",
            multiprocess_mode="livemin",
        )
        self.quarantined = counter(
            "callstream_ingress_quarantined_total",
            "Authenticated requests refused with a 4xx and kept on the quarantine topic "
            "(<topic>.rejected), by problem slug.",
            ["reason"],
        )
        self.by_reason = {reason: self.quarantined.labels(reason) for reason in QUARANTINE_REASONS}
        self.quarantine_failed = counter(
            "callstream_ingress_quarantine_failures_total",
            "Refused requests that could not be kept (answered 503 so the sender retries).",
        )
        self.inflight_body_bytes = gauge(
            "callstream_ingress_inflight_body_bytes",
            "Bytes of request bodies held now, against CALLSTREAM_MAX_INFLIGHT_BODY_BYTES"
            " (a limit per worker; summed over workers).",
            multiprocess_mode="livesum",
        )
        self.spool = SpoolMetrics(registry, self.sampled)

    def outcome(self, slug: str) -> None:
        (self.by_outcome.get(slug) or self.by_outcome["internal-error"]).inc()

    def kept(self, slug: str) -> None:
        (self.by_reason.get(slug) or self.by_reason["other"]).inc()

    def event(self, event_type: str, source_format: str) -> None:
        bounded = event_type if event_type in KNOWN_EVENT_TYPES else "other"
        self.by_event[(bounded, source_format)].inc()
