"""The `metrics` consumer: business metrics per call, counted once per call id, ever.

Reports are built the way the runner sees them: the real sample (and variants of it) through
the normaliser, an Avro round trip on the current schema, then `CallReport.from_record`.
"""

from __future__ import annotations

import copy
import itertools
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry, Counter

from consumers.contract import Delivery
from consumers.errors import RetryableError
from consumers.metrics import MetricsConfigError, MetricsConsumer, build
from core.settings import SettingsError
from schemas.codec import Decoder, single_object_encoder
from schemas.normalise import normalise
from schemas.report import CallReport
from schemas.store import END_OF_CALL_REPORT, default_store
from tests.support.paths import REPO

SAMPLE_PATH = REPO.parent / "shared" / "samples" / "end-of-call-report.json"
NESTED_PATH = REPO / "tests" / "data" / "nested-camel.json"
EXAMPLE_CONFIG = REPO / "examples" / "metrics.yaml"
SAMPLE: dict[str, Any] = orjson.loads(SAMPLE_PATH.read_bytes())
SAMPLE_ASSISTANT = "+31850835003"  # toAssistant in the sample
SAMPLE_CALLER = "+31623731537"

ENCODER = single_object_encoder(default_store().current(END_OF_CALL_REPORT))
DECODER = Decoder(default_store())
_OFFSETS = itertools.count()
DROP = object()  # a variant without this key
KEEP = object()

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- building reports ----------------------------------------------------------------------


def flat(
    call_id: str | None = None,
    *,
    evaluation: Any = KEEP,
    structured: Mapping[str, Any] | None = None,
    **top: Any,
) -> dict[str, Any]:
    """The sample with a fresh (or given) call id and the given changes."""
    payload = copy.deepcopy(SAMPLE)
    payload["callId"] = call_id or str(uuid.uuid4())
    _apply(payload, top)
    analysis = payload["analysis"]
    if evaluation is not KEEP:
        _apply(analysis, {"successEvaluation": evaluation})
    _apply(analysis["structuredData"], structured or {})
    return payload


def _apply(target: dict[str, Any], changes: Mapping[str, Any]) -> None:
    for key, value in changes.items():
        if value is DROP:
            target.pop(key, None)
        else:
            target[key] = value


def deliver(payload: dict[str, Any]) -> Delivery:
    normalised = normalise(
        payload, received_at_ms=int(time.time() * 1000), request_id=str(uuid.uuid4())
    )
    assert normalised.record is not None
    value = ENCODER.encode(normalised.record)
    report = CallReport.from_record(DECODER.decode_local(value).record)
    return Delivery(report, "flireo.end-of-call-report", 0, next(_OFFSETS), value)


# -- reading metrics -----------------------------------------------------------------------


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    sample = registry.get_sample_value(name, labels)
    assert sample is not None, f"{name}{labels} is not exposed"
    return sample


def business_samples(registry: CollectorRegistry) -> Samples:
    """Every sample except the consumer's own bookkeeping and creation times."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
        and not sample.name.startswith("callstream_metrics_")
    }


def changed(before: Samples, after: Samples) -> Samples:
    return {
        key: after[key] - before.get(key, 0.0)
        for key in after
        if after[key] != before.get(key, 0.0)
    }


# -- running a consumer --------------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        # a directory that does not exist yet: the consumer creates it
        "CALLSTREAM_METRICS_STATE_PATH": str(tmp_path / "state" / "metrics.db"),
        "CALLSTREAM_METRICS_ASSISTANTS": f"{SAMPLE_ASSISTANT}=julia, +31 85 083 5037",
    }


@asynccontextmanager
async def running(
    env: Mapping[str, str], registry: CollectorRegistry
) -> AsyncIterator[MetricsConsumer]:
    consumer = build(env, registry)
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def handled(
    env: Mapping[str, str], *batches: Sequence[Delivery]
) -> tuple[CollectorRegistry, MetricsConsumer]:
    registry = CollectorRegistry()
    async with running(env, registry) as consumer:
        for batch in batches:
            await consumer.handle(batch)
    return registry, consumer


# -- each metric ---------------------------------------------------------------------------


async def test_sample_report_moves_every_builtin_metric_once(env: dict[str, str]) -> None:
    registry, _ = await handled(env, [deliver(flat())])

    # 132.5 s: above the 120 s bound, inside every bound from 180 s up
    duration_buckets = [
        "180.0",
        "300.0",
        "420.0",
        "600.0",
        "900.0",
        "1200.0",
        "1800.0",
        "2700.0",
        "3600.0",
        "+Inf",
    ]
    expected: Samples = {
        ("callstream_calls_total", (("assistant", "julia"), ("outcome", "success"))): 1.0,
        **{
            ("callstream_call_duration_seconds_bucket", (("le", le),)): 1.0
            for le in duration_buckets
        },
        ("callstream_call_duration_seconds_count", ()): 1.0,
        ("callstream_call_duration_seconds_sum", ()): 132.5,
        # sentiment 9: in the 9 and 10 buckets, not in 8
        ("callstream_call_sentiment_bucket", (("le", "9.0"),)): 1.0,
        ("callstream_call_sentiment_bucket", (("le", "10.0"),)): 1.0,
        ("callstream_call_sentiment_bucket", (("le", "+Inf"),)): 1.0,
        ("callstream_call_sentiment_count", ()): 1.0,
        ("callstream_call_sentiment_sum", ()): 9.0,
        ("callstream_call_success_evaluations_total", (("result", "true"),)): 1.0,
        # vervolgactie_nodig is true; technische_problemen is false and counts nothing
        ("callstream_call_followups_total", ()): 1.0,
    }
    assert changed({}, business_samples(registry)) == expected
    assert value(registry, "callstream_call_technical_problems_total") == 0
    assert value(registry, "callstream_metrics_duplicates_ignored_total") == 0


async def test_every_series_exists_at_zero_before_the_first_call(env: dict[str, str]) -> None:
    registry, _ = await handled(env)

    for assistant in ("julia", "+31850835037", "other"):
        for outcome in ("success", "failure", "unknown"):
            labels = {"assistant": assistant, "outcome": outcome}
            assert value(registry, "callstream_calls_total", **labels) == 0
    for result in ("true", "false", "other"):
        assert value(registry, "callstream_call_success_evaluations_total", result=result) == 0
    for field in ("sentiment", "vervolgactie_nodig", "technische_problemen"):
        assert value(registry, "callstream_metrics_invalid_values_total", field=field) == 0
    assert value(registry, "callstream_call_followups_total") == 0


async def test_technical_problems_count_calls_that_had_them(env: dict[str, str]) -> None:
    batch = [
        deliver(flat(structured={"technische_problemen": True})),
        deliver(flat(structured={"technische_problemen": "yes"})),
        deliver(flat(structured={"technische_problemen": False})),
        deliver(flat(structured={"technische_problemen": DROP})),
    ]
    registry, _ = await handled(env, batch)

    assert value(registry, "callstream_call_technical_problems_total") == 2
    assert value(registry, "callstream_calls_total", assistant="julia", outcome="success") == 4


async def test_missing_fields_count_the_call_but_observe_nothing(env: dict[str, str]) -> None:
    payload = flat(evaluation=DROP, callLengthSeconds=DROP)
    del payload["analysis"]["structuredData"]
    registry, _ = await handled(env, [deliver(payload)])

    assert value(registry, "callstream_calls_total", assistant="julia", outcome="unknown") == 1
    assert value(registry, "callstream_call_duration_seconds_count") == 0
    assert value(registry, "callstream_call_sentiment_count") == 0
    for result in ("true", "false", "other"):
        assert value(registry, "callstream_call_success_evaluations_total", result=result) == 0
    for field in ("sentiment", "vervolgactie_nodig", "technische_problemen"):
        assert value(registry, "callstream_metrics_invalid_values_total", field=field) == 0


async def test_unusable_values_are_counted_as_invalid_not_guessed(env: dict[str, str]) -> None:
    structured = {"sentiment": "hoog", "vervolgactie_nodig": "misschien", "technische_problemen": 1}
    registry, _ = await handled(env, [deliver(flat(structured=structured))])

    for field in ("sentiment", "vervolgactie_nodig", "technische_problemen"):
        assert value(registry, "callstream_metrics_invalid_values_total", field=field) == 1
    assert value(registry, "callstream_call_sentiment_count") == 0
    assert value(registry, "callstream_call_followups_total") == 0
    assert value(registry, "callstream_call_technical_problems_total") == 0


async def test_numeric_strings_are_observed_as_numbers(env: dict[str, str]) -> None:
    registry, _ = await handled(env, [deliver(flat(structured={"sentiment": " 7.5 "}))])

    assert value(registry, "callstream_call_sentiment_sum") == 7.5
    assert value(registry, "callstream_call_sentiment_bucket", le="7.0") == 0
    assert value(registry, "callstream_call_sentiment_bucket", le="8.0") == 1


async def test_nested_format_report_is_measured_from_its_own_fields(env: dict[str, str]) -> None:
    nested = orjson.loads(NESTED_PATH.read_bytes())
    registry, _ = await handled(env, [deliver(nested)])

    # phoneNumber.number +31850835037 is allow-listed without a label (and with spaces)
    labels = {"assistant": "+31850835037", "outcome": "unknown"}
    assert value(registry, "callstream_calls_total", **labels) == 1
    assert value(registry, "callstream_call_duration_seconds_sum") == 84
    assert value(registry, "callstream_call_sentiment_sum") == 8
    assert value(registry, "callstream_call_success_evaluations_total", result="other") == 0


async def test_structured_data_keys_are_configurable(env: dict[str, str]) -> None:
    env |= {
        "CALLSTREAM_METRICS_SENTIMENT_KEY": "ai_ervaring",
        "CALLSTREAM_METRICS_FOLLOWUP_KEY": "vraag_beantwoord",
        "CALLSTREAM_METRICS_TECHNICAL_PROBLEMS_KEY": "vervolgactie_nodig",
    }
    structured = {"vraag_beantwoord": False}
    registry, _ = await handled(env, [deliver(flat(structured=structured))])

    assert value(registry, "callstream_call_sentiment_sum") == 10  # ai_ervaring
    assert value(registry, "callstream_call_followups_total") == 0  # vraag_beantwoord false
    assert value(registry, "callstream_call_technical_problems_total") == 1


# -- assistant label -----------------------------------------------------------------------


async def test_allow_listed_assistant_gets_its_label(env: dict[str, str]) -> None:
    registry, _ = await handled(env, [deliver(flat()), deliver(flat(toAssistant="+31850835037"))])

    assert value(registry, "callstream_calls_total", assistant="julia", outcome="success") == 1
    labels = {"assistant": "+31850835037", "outcome": "success"}
    assert value(registry, "callstream_calls_total", **labels) == 1
    assert value(registry, "callstream_calls_total", assistant="other", outcome="success") == 0


async def test_other_assistants_share_one_label_and_no_number_leaks(env: dict[str, str]) -> None:
    reports = [
        deliver(flat(toAssistant="+31201234567")),
        deliver(flat(toAssistant="+3185083500")),  # a prefix of a listed number is not it
        deliver(flat(toAssistant=DROP)),
    ]
    registry, _ = await handled(env, reports)

    assert value(registry, "callstream_calls_total", assistant="other", outcome="success") == 3
    label_values = {
        label
        for family in registry.collect()
        for sample in family.samples
        for label in sample.labels.values()
    }
    personal = {"+31201234567", "+3185083500", SAMPLE_CALLER, SAMPLE_ASSISTANT}
    personal |= {delivery.report.call_id for delivery in reports}
    assert not label_values & personal


async def test_without_an_allow_list_every_call_is_other(env: dict[str, str]) -> None:
    del env["CALLSTREAM_METRICS_ASSISTANTS"]
    registry, _ = await handled(env, [deliver(flat())])

    assert value(registry, "callstream_calls_total", assistant="other", outcome="success") == 1


# -- outcome mapping -----------------------------------------------------------------------

OUTCOME_TABLE: list[tuple[Any, str, str | None]] = [
    # success_evaluation, outcome (threshold 7), success_evaluations_total result
    (True, "success", "true"),
    ("true", "success", "true"),
    ("TRUE", "success", "true"),
    (" yes ", "success", "other"),
    ("Yes", "success", "other"),
    (False, "failure", "false"),
    ("false", "failure", "false"),
    ("no", "failure", "other"),
    (10, "success", "other"),
    (7, "success", "other"),
    (7.0, "success", "other"),
    ("8", "success", "other"),
    ("7.5", "success", "other"),
    (6.9, "failure", "other"),
    (0, "failure", "other"),
    ("3", "failure", "other"),
    ("Good", "unknown", "other"),
    ("8/10", "unknown", "other"),
    ("nan", "unknown", "other"),
    ("", "unknown", "other"),
    (DROP, "unknown", None),  # no evaluation: not an evaluation result either
]


@pytest.mark.parametrize(("evaluation", "outcome", "result"), OUTCOME_TABLE)
async def test_success_evaluation_maps_to_outcome_and_result(
    env: dict[str, str], evaluation: Any, outcome: str, result: str | None
) -> None:
    registry, _ = await handled(env, [deliver(flat(evaluation=evaluation))])

    for candidate in ("success", "failure", "unknown"):
        expected = 1 if candidate == outcome else 0
        labels = {"assistant": "julia", "outcome": candidate}
        assert value(registry, "callstream_calls_total", **labels) == expected
    for candidate in ("true", "false", "other"):
        expected = 1 if candidate == result else 0
        metric = "callstream_call_success_evaluations_total"
        assert value(registry, metric, result=candidate) == expected


@pytest.mark.parametrize(
    ("evaluation", "outcome"),
    [(70, "success"), ("85", "success"), (69.9, "failure"), (8, "failure"), (True, "success")],
)
async def test_success_threshold_is_configurable(
    env: dict[str, str], evaluation: Any, outcome: str
) -> None:
    env["CALLSTREAM_METRICS_SUCCESS_THRESHOLD"] = "70"
    registry, _ = await handled(env, [deliver(flat(evaluation=evaluation))])

    assert value(registry, "callstream_calls_total", assistant="julia", outcome=outcome) == 1


# -- replays and duplicates ----------------------------------------------------------------


async def test_replayed_batch_changes_no_business_metric(env: dict[str, str]) -> None:
    batch = [deliver(flat()), deliver(flat(evaluation="no")), deliver(flat(toAssistant="+3120"))]
    registry = CollectorRegistry()
    async with running(env, registry) as consumer:
        await consumer.handle(batch)
        once = business_samples(registry)
        await consumer.handle(batch)

        assert business_samples(registry) == once
        assert value(registry, "callstream_calls_total", assistant="other", outcome="success") == 1
        assert value(registry, "callstream_metrics_duplicates_ignored_total") == 3


async def test_duplicate_inside_one_batch_is_counted_once(env: dict[str, str]) -> None:
    call_id = str(uuid.uuid4())
    first = deliver(flat(call_id, callLengthSeconds=60))
    again = deliver(flat(call_id, callLengthSeconds=60))
    newer = deliver(flat(call_id, callLengthSeconds=600, evaluation="false"))
    other = deliver(flat(callLengthSeconds=30))
    registry, _ = await handled(env, [first, again, other, newer])

    assert value(registry, "callstream_calls_total", assistant="julia", outcome="success") == 2
    assert value(registry, "callstream_calls_total", assistant="julia", outcome="failure") == 0
    assert value(registry, "callstream_call_duration_seconds_count") == 2
    assert value(registry, "callstream_call_duration_seconds_sum") == 90  # the first version
    assert value(registry, "callstream_metrics_duplicates_ignored_total") == 2


async def test_newer_version_of_a_counted_call_is_not_counted_again(env: dict[str, str]) -> None:
    call_id = str(uuid.uuid4())
    original = deliver(flat(call_id, evaluation="true", structured={"sentiment": 9}))
    corrected = deliver(flat(call_id, evaluation="false", structured={"sentiment": 2}))
    registry = CollectorRegistry()
    async with running(env, registry) as consumer:
        await consumer.handle([original])
        before = business_samples(registry)
        await consumer.handle([corrected])

        assert business_samples(registry) == before
        assert value(registry, "callstream_metrics_duplicates_ignored_total") == 1


async def test_restart_does_not_recount_what_the_ledger_holds(env: dict[str, str]) -> None:
    batch = [deliver(flat()), deliver(flat(evaluation="false"))]
    await handled(env, batch)

    # a new process: new registry, same ledger file; the batch is replayed, then a new call
    fresh = deliver(flat(evaluation="no", callLengthSeconds=30))
    registry, _ = await handled(env, batch, [fresh])

    assert value(registry, "callstream_calls_total", assistant="julia", outcome="success") == 0
    assert value(registry, "callstream_calls_total", assistant="julia", outcome="failure") == 1
    assert value(registry, "callstream_call_duration_seconds_count") == 1
    assert value(registry, "callstream_call_duration_seconds_sum") == 30
    assert value(registry, "callstream_metrics_duplicates_ignored_total") == 2


async def test_ledger_holds_one_durable_row_per_counted_call(env: dict[str, str]) -> None:
    call_id = str(uuid.uuid4())
    await handled(env, [deliver(flat(call_id)), deliver(flat(call_id)), deliver(flat())])

    path = env["CALLSTREAM_METRICS_STATE_PATH"]
    with closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT call_id FROM counted").fetchall()
        journal = db.execute("PRAGMA journal_mode").fetchone()[0]
    assert len(rows) == 2
    assert (call_id,) in rows
    assert journal == "wal"


async def test_crash_after_ledger_commit_loses_the_observation_instead_of_doubling(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    delivery = deliver(flat())
    registry = CollectorRegistry()
    async with running(env, registry) as consumer:

        def crash(report: CallReport) -> None:
            raise RuntimeError("process died here")

        monkeypatch.setattr(consumer, "_observe", crash)
        with pytest.raises(RuntimeError):
            await consumer.handle([delivery])
        monkeypatch.undo()
        await consumer.handle([delivery])  # the redelivery after the crash

    assert value(registry, "callstream_calls_total", assistant="julia", outcome="success") == 0
    assert value(registry, "callstream_metrics_duplicates_ignored_total") == 1


# -- the ledger unavailable ----------------------------------------------------------------


async def test_unreachable_ledger_is_retryable_and_recovers(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the ledger's directory should be")
    env = {"CALLSTREAM_METRICS_STATE_PATH": str(blocker / "metrics.db")}
    registry = CollectorRegistry()
    consumer = build(env, registry)
    delivery = deliver(flat())

    with pytest.raises(RetryableError):
        await consumer.start()
    with pytest.raises(RetryableError):
        await consumer.handle([delivery])
    assert value(registry, "callstream_calls_total", assistant="other", outcome="success") == 0

    blocker.unlink()  # the volume is back
    await consumer.handle([delivery])
    await consumer.stop()
    assert value(registry, "callstream_calls_total", assistant="other", outcome="success") == 1


@pytest.mark.parametrize("damage", ["directory", "garbage"])
async def test_unusable_ledger_file_is_retryable(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "metrics.db"
    if damage == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"this is not an sqlite database" * 200)
    registry = CollectorRegistry()
    consumer = build({"CALLSTREAM_METRICS_STATE_PATH": str(path)}, registry)

    with pytest.raises(RetryableError, match="metrics ledger"):
        await consumer.handle([deliver(flat())])
    await consumer.stop()
    assert value(registry, "callstream_calls_total", assistant="other", outcome="success") == 0


# -- configured fields ---------------------------------------------------------------------


async def test_example_config_turns_fields_into_metrics(env: dict[str, str]) -> None:
    env["CALLSTREAM_METRICS_CONFIG"] = str(EXAMPLE_CONFIG)
    batch = [
        deliver(flat()),  # ai_ervaring 10, bedrijf_waardering 9, vraag_beantwoord true
        deliver(flat(structured={"ai_ervaring": "6", "vraag_beantwoord": "no"})),
        deliver(flat(structured={"ai_ervaring": "veel", "vraag_beantwoord": "ja"})),
        deliver(flat(structured={"ai_ervaring": DROP, "vraag_beantwoord": DROP})),
    ]
    registry, _ = await handled(env, batch)

    assert value(registry, "callstream_call_field_ai_experience_count") == 2
    assert value(registry, "callstream_call_field_ai_experience_sum") == 16
    assert value(registry, "callstream_call_field_ai_experience_bucket", le="6.0") == 1
    assert value(registry, "callstream_call_field_bedrijf_waardering_count") == 4
    assert value(registry, "callstream_call_field_vraag_beantwoord_true_total") == 1
    invalid = "callstream_metrics_invalid_values_total"
    assert value(registry, invalid, field="ai_ervaring") == 1
    assert value(registry, invalid, field="vraag_beantwoord") == 1
    assert value(registry, invalid, field="bedrijf_waardering") == 0


async def test_configured_fields_are_not_recounted_on_replay(env: dict[str, str]) -> None:
    env["CALLSTREAM_METRICS_CONFIG"] = str(EXAMPLE_CONFIG)
    batch = [deliver(flat())]
    registry, _ = await handled(env, batch, batch)

    assert value(registry, "callstream_call_field_ai_experience_count") == 1
    assert value(registry, "callstream_call_field_vraag_beantwoord_true_total") == 1


def _write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "metrics.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


NUMERIC = "type: numeric, buckets: [1, 2]"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("fields: [", "not valid YAML"),
        ("- key: a", "top level must be a mapping"),
        ("field: []", "unknown top-level keys"),
        ("fields: {key: a}", "`fields` must be a list"),
        ("fields: [ai_ervaring]", "must be a mapping"),
        ("fields: [{type: boolean}]", "`key`"),
        ("fields: [{key: a, type: boolean, bucket: [1]}]", "unknown keys ['bucket']"),
        ("fields: [{key: ai-ervaring, type: boolean}]", "give the field a `name`"),
        ("fields: [{key: a, name: 'é', type: boolean}]", "[a-zA-Z0-9_]"),
        ("fields: [{key: a, name: 'a:b', type: boolean}]", "[a-zA-Z0-9_]"),
        ("fields: [{key: a, name: a_total, type: boolean}]", "must not end in"),
        ("fields: [{key: a, name: a_bucket, " + NUMERIC + "}]", "must not end in"),
        ("fields: [{key: a, type: string}]", "numeric or boolean"),
        ("fields: [{key: a, type: numeric}]", "needs a non-empty `buckets`"),
        ("fields: [{key: a, type: numeric, buckets: []}]", "needs a non-empty `buckets`"),
        ("fields: [{key: a, type: numeric, buckets: [1, 1]}]", "strictly increasing"),
        ("fields: [{key: a, type: numeric, buckets: [2, 1]}]", "strictly increasing"),
        ("fields: [{key: a, type: numeric, buckets: [1, true]}]", "must be numbers"),
        ("fields: [{key: a, type: numeric, buckets: [1, '2']}]", "must be numbers"),
        ("fields: [{key: a, type: numeric, buckets: [1, .inf]}]", "finite"),
        ("fields: [{key: a, type: boolean, buckets: [1]}]", "boolean field has no buckets"),
        ("fields: [{key: a, type: boolean, help: ''}]", "`help`"),
        ("fields: [{key: sentiment, name: s, " + NUMERIC + "}]", "already measured by a built-in"),
        ("fields: [{key: vervolgactie_nodig, name: v, type: boolean}]", "already measured"),
        ("fields: [{key: a, type: boolean}, {key: a, name: b, type: boolean}]", "listed twice"),
        (
            "fields: [{key: a, name: x, type: boolean}, {key: b, name: x, " + NUMERIC + "}]",
            "metric name 'x' listed twice",
        ),
        # x_true's histogram and x's boolean counter would both expose x_true_created
        (
            "fields: [{key: a, name: x_true, " + NUMERIC + "}, {key: b, name: x, type: boolean}]",
            "collides",
        ),
    ],
)
def test_invalid_config_is_refused_at_build(
    env: dict[str, str], tmp_path: Path, config: str, message: str
) -> None:
    env["CALLSTREAM_METRICS_CONFIG"] = _write_config(tmp_path, config)

    with pytest.raises(MetricsConfigError) as refused:
        build(env, CollectorRegistry())
    assert message in str(refused.value)
    assert "metrics.yaml" in str(refused.value)


def test_missing_config_file_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    env["CALLSTREAM_METRICS_CONFIG"] = str(tmp_path / "absent.yaml")

    with pytest.raises(MetricsConfigError, match="CALLSTREAM_METRICS_CONFIG"):
        build(env, CollectorRegistry())


def test_builtin_key_guard_follows_the_configured_keys(env: dict[str, str], tmp_path: Path) -> None:
    env["CALLSTREAM_METRICS_SENTIMENT_KEY"] = "stemming"
    env["CALLSTREAM_METRICS_CONFIG"] = _write_config(
        tmp_path, "fields: [{key: stemming, name: s, type: numeric, buckets: [1]}]"
    )
    with pytest.raises(MetricsConfigError, match="already measured"):
        build(env, CollectorRegistry())

    env["CALLSTREAM_METRICS_CONFIG"] = _write_config(
        tmp_path, "fields: [{key: sentiment, name: s, type: numeric, buckets: [1]}]"
    )
    registry = CollectorRegistry()
    build(env, registry)
    assert value(registry, "callstream_call_field_s_count") == 0


def test_field_name_taken_on_the_service_registry_is_refused(
    env: dict[str, str], tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    Counter("callstream_call_field_taken_true", "already here", registry=registry)
    env["CALLSTREAM_METRICS_CONFIG"] = _write_config(
        tmp_path, "fields: [{key: taken, type: boolean}]"
    )

    with pytest.raises(MetricsConfigError, match="callstream_call_field_taken_true_total"):
        build(env, registry)


def test_empty_config_file_adds_no_fields(env: dict[str, str], tmp_path: Path) -> None:
    env["CALLSTREAM_METRICS_CONFIG"] = _write_config(tmp_path, "# nothing yet\n")
    consumer = build(env, CollectorRegistry())
    assert consumer.fields == {}


# -- invalid environment -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "raw", "message"),
    [
        ("CALLSTREAM_METRICS_ASSISTANTS", "julia=+31850835003", "is not a phone number"),
        ("CALLSTREAM_METRICS_ASSISTANTS", "+31850835003=", "label"),
        ("CALLSTREAM_METRICS_ASSISTANTS", "+31850835003=other", "every number not listed"),
        ("CALLSTREAM_METRICS_ASSISTANTS", "+31850835003,+31 850 835 003=x", "listed twice"),
        ("CALLSTREAM_METRICS_SUCCESS_THRESHOLD", "high", "is not a number"),
        ("CALLSTREAM_METRICS_SUCCESS_THRESHOLD", "inf", "not finite"),
        ("CALLSTREAM_METRICS_FOLLOWUP_KEY", "technische_problemen", "three different"),
    ],
)
def test_invalid_environment_is_refused_at_build(
    env: dict[str, str], variable: str, raw: str, message: str
) -> None:
    env[variable] = raw

    with pytest.raises(SettingsError, match=variable) as refused:
        build(env, CollectorRegistry())
    assert message in str(refused.value)


def test_settings_default_to_the_documented_values() -> None:
    consumer = build({}, CollectorRegistry())
    settings = consumer.settings

    assert consumer.name == "metrics"
    assert settings.state_path == Path(".callstream/metrics.db")
    assert settings.success_threshold == 7
    assert (settings.sentiment_key, settings.followup_key, settings.technical_problems_key) == (
        "sentiment",
        "vervolgactie_nodig",
        "technische_problemen",
    )
    assert settings.assistants == ()
    assert settings.fields == ()
