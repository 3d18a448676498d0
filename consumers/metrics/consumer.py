"""The `metrics` consumer: business metrics about calls, served on the service's /metrics.

Metrics (all on the injected registry; no label ever holds a call id or a caller's number):

==============================================  =======================================
``callstream_calls_total{assistant, outcome}``  counted calls
``callstream_call_duration_seconds``            histogram, 5 s .. 1 h
``callstream_call_sentiment``                   histogram, 0..10, structured_data sentiment
``callstream_call_success_evaluations_total``   ``{result}``: true / false / other
``callstream_call_followups_total``             structured_data vervolgactie_nodig is true
``callstream_call_technical_problems_total``    structured_data technische_problemen is true
``callstream_call_field_<name>``                histogram per configured numeric field
``callstream_call_field_<name>_true_total``     counter per configured boolean field
``callstream_metrics_duplicates_ignored_total`` reports not counted: call already counted
``callstream_metrics_invalid_values_total``     ``{field}``: structured_data key unusable
==============================================  =======================================

``assistant`` is the report's to_number's label from CALLSTREAM_METRICS_ASSISTANTS, else
``other``. ``outcome`` maps success_evaluation:

==========================================================  ===========
true, "true", "yes" (any case)                              ``success``
false, "false", "no" (any case)                             ``failure``
a number or numeric string >= the threshold (default 7)     ``success``
a number or numeric string < the threshold                  ``failure``
missing, any other word ("Good", "8/10"), NaN/infinity      ``unknown``
==========================================================  ===========

``result`` is the literal pass/fail answer: ``true`` for true/"true", ``false`` for
false/"false", ``other`` for anything else; reports without an evaluation are not counted
there. A boolean field counts as true for JSON true or "true"/"yes"; a numeric field takes
a number or a numeric string. Anything else in a present field is counted in
``callstream_metrics_invalid_values_total`` instead of being guessed at.

Replays and duplicates: each call is counted once, the first time its call_id is seen, ever.
A durable ledger (SQLite, CALLSTREAM_METRICS_STATE_PATH) records the counted call ids. A
later, newer version of the same call is not counted again either: a histogram cannot
un-observe the old duration or sentiment, so "replace" would still double count; first
version wins. The ledger has to outlive the process because replays arrive long after a
restart, while the Prometheus values themselves restart at 0 (rate() absorbs that reset).
One ledger serves one consumer instance: run a single replica, or a partition moving to a
replica with another ledger is counted again there.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram

from consumers.contract import Consumer, Delivery
from consumers.metrics.config_file import FieldMetric, MetricsConfigError
from consumers.metrics.ledger import Ledger
from consumers.metrics.settings import OTHER_ASSISTANT, MetricsSettings, normalise_number
from schemas.report import CallReport

log = logging.getLogger("callstream.consumers.metrics")

Outcome = Literal["success", "failure", "unknown"]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)
EVALUATION_RESULTS = ("true", "false", "other")

_FLAG_WORDS = {"true": True, "yes": True, "false": False, "no": False}
_NUMERIC = re.compile(r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")
# Phone calls: a 5 s hang-up up to an hour-long conversation.
DURATION_BUCKETS = (5, 10, 15, 30, 45, 60, 90, 120, 180, 300, 420, 600, 900, 1200, 1800, 2700, 3600)
# Sentiment is scored 0..10 in whole steps, so one bucket per score.
SENTIMENT_BUCKETS = tuple(range(11))


def as_number(value: Any) -> float | None:
    """A finite number, also from a numeric string (LLM extractions sometimes quote them)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str) and _NUMERIC.match(value.strip()):
        number = float(value.strip())
    else:
        return None
    return number if math.isfinite(number) else None


def as_flag(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    return _FLAG_WORDS.get(value.strip().lower()) if isinstance(value, str) else None


def success_outcome(evaluation: bool | float | str | None, threshold: float) -> Outcome:
    flag = as_flag(evaluation)
    if flag is not None:
        return "success" if flag else "failure"
    number = as_number(evaluation)
    if number is None:
        return "unknown"
    return "success" if number >= threshold else "failure"


def evaluation_result(evaluation: bool | float | str) -> str:
    if isinstance(evaluation, bool):
        return "true" if evaluation else "false"
    word = evaluation.strip().lower() if isinstance(evaluation, str) else ""
    return word if word in ("true", "false") else "other"


class MetricsConsumer(Consumer):
    """Counts each call once into business metrics on the service's registry."""

    name = "metrics"

    def __init__(self, settings: MetricsSettings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self._ledger = Ledger(settings.state_path)
        self._assistants = dict(settings.assistants)
        labels = sorted({*self._assistants.values(), OTHER_ASSISTANT})

        self.calls = Counter(
            "callstream_calls_total",
            "Calls counted, once per call id, by assistant (allow-listed number or other) "
            "and outcome of the success evaluation.",
            ["assistant", "outcome"],
            registry=registry,
        )
        # Children up front: every series exists (at 0) from the first scrape, so rate() and
        # ratios in the dashboard work before the first call of a kind.
        self._calls = {
            (label, outcome): self.calls.labels(label, outcome)
            for label in labels
            for outcome in OUTCOMES
        }
        self.duration = Histogram(
            "callstream_call_duration_seconds",
            "Call length of each counted call.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.sentiment = Histogram(
            "callstream_call_sentiment",
            f"structured_data.{settings.sentiment_key} (0..10) of each counted call.",
            buckets=SENTIMENT_BUCKETS,
            registry=registry,
        )
        self.evaluations = Counter(
            "callstream_call_success_evaluations_total",
            "Counted calls with a success evaluation, by its literal value: true, false, "
            "or other (scores, words).",
            ["result"],
            registry=registry,
        )
        self._evaluations = {r: self.evaluations.labels(r) for r in EVALUATION_RESULTS}
        self.followups = Counter(
            "callstream_call_followups_total",
            f"Counted calls whose structured_data.{settings.followup_key} is true.",
            registry=registry,
        )
        self.technical_problems = Counter(
            "callstream_call_technical_problems_total",
            f"Counted calls whose structured_data.{settings.technical_problems_key} is true.",
            registry=registry,
        )
        self.duplicates = Counter(
            "callstream_metrics_duplicates_ignored_total",
            "Reports not counted because their call id was counted before "
            "(replays, redeliveries, newer versions of a call).",
            registry=registry,
        )
        self.invalid = Counter(
            "callstream_metrics_invalid_values_total",
            "Counted calls whose structured_data field was present but not usable "
            "(wrong type), by structured_data key.",
            ["field"],
            registry=registry,
        )
        self.fields = {field.key: _field_metric(field, registry) for field in settings.fields}
        # The structured_data fields measured, built-ins first. The invalid-values counter is
        # labelled by these keys: the name an operator finds in the assistant's analysis plan,
        # and unique because the settings refuse a key measured twice.
        self._measured: dict[str, Histogram | Counter] = {
            settings.sentiment_key: self.sentiment,
            settings.followup_key: self.followups,
            settings.technical_problems_key: self.technical_problems,
            **self.fields,
        }
        self._invalid = {key: self.invalid.labels(key) for key in self._measured}

    async def start(self) -> None:
        await self._ledger.open()
        log.info(
            "metrics ledger open",
            extra={"path": str(self._ledger.path), "custom_fields": len(self.fields)},
        )

    async def stop(self) -> None:
        await self._ledger.close()

    async def handle(self, batch: Sequence[Delivery]) -> None:
        first_seen: dict[str, CallReport] = {}
        for delivery in batch:
            first_seen.setdefault(delivery.report.call_id, delivery.report)
        reports = list(first_seen.values())
        claimed = await self._ledger.claim(reports)
        # Observed only after the ledger committed. A crash between the two loses these
        # observations (the ledger says counted, the metrics never saw them); the other order
        # would count them twice on redelivery. Losing a few is the lesser harm for metrics
        # that restart at 0 on every process restart anyway.
        for report in reports:
            if report.call_id in claimed:
                self._observe(report)
        self.duplicates.inc(len(batch) - len(claimed))

    def _observe(self, report: CallReport) -> None:
        self._calls[
            self._assistant(report.to_number),
            success_outcome(report.success_evaluation, self.settings.success_threshold),
        ].inc()
        if report.success_evaluation is not None:
            self._evaluations[evaluation_result(report.success_evaluation)].inc()
        if report.duration_seconds is not None and math.isfinite(report.duration_seconds):
            self.duration.observe(report.duration_seconds)

        data: Mapping[str, Any] = report.structured_data or {}
        for key, metric in self._measured.items():
            value = data.get(key)
            if value is None:
                continue
            reading = as_number(value) if isinstance(metric, Histogram) else as_flag(value)
            if reading is None:
                self._invalid[key].inc()
            elif isinstance(metric, Histogram):
                metric.observe(reading)
            elif reading:
                metric.inc()

    def _assistant(self, to_number: str | None) -> str:
        # No number at all is "", which matches no listed number.
        return self._assistants.get(normalise_number(to_number or ""), OTHER_ASSISTANT)


def _field_metric(field: FieldMetric, registry: CollectorRegistry) -> Histogram | Counter:
    try:
        if field.kind == "numeric":
            return Histogram(
                field.metric_name, field.help, buckets=field.buckets, registry=registry
            )
        return Counter(field.metric_name, field.help, registry=registry)
    except ValueError as exc:  # the registry refuses a name another metric already exposes
        raise MetricsConfigError(f"{field.metric_name}: {exc}") from exc


def build(env: Mapping[str, str], registry: CollectorRegistry) -> MetricsConsumer:
    return MetricsConsumer(MetricsSettings.from_env(env), registry)
