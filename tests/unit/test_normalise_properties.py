"""Properties of the normalisers and the JSON parser, over generated input.

Three promises the ingress relies on:

* whatever JSON arrives, `normalise` answers with a `Normalised` or an `InvalidReport` (a 4xx),
  never with another exception (a 500);
* a valid report survives normalise -> Avro encode -> decode -> denormalise byte for byte,
  JSON types included (1 stays 1, 1.0 stays 1.0, null stays null, unknown keys stay);
* `jsonvalue.parse` turns any bytes into a bounded JSON value or an `InvalidReport`.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from schemas import jsonvalue
from schemas.errors import InvalidReport
from schemas.normalise import FIELDS, Normalised, SourceFormat, denormalise, normalise
from schemas.report import CallReport
from schemas.store import FLIREO_EVENT
from tests.support.avro import through_avro
from tests.support.jsontree import objects
from tests.support.paths import DATA
from tests.support.samples import SAMPLE

FIXTURES: dict[SourceFormat, Any] = {
    "FLAT": orjson.loads(SAMPLE.read_bytes()),
    "NESTED_CAMEL": orjson.loads((DATA / "nested-camel.json").read_bytes()),
    "NESTED_SNAKE": orjson.loads((DATA / "nested-snake.json").read_bytes()),
    "VAPI": orjson.loads((DATA / "payloads" / "vapi-end-of-call.json").read_bytes()),
}
STATUS_UPDATE = orjson.loads((DATA / "status-update.json").read_bytes())
# Every key the normalisers give meaning to. Generated extra keys avoid these, so that an
# "unknown key" never turns into a known field with a random value (or a different format).
RESERVED = frozenset(
    {
        part
        for fields in FIELDS.values()
        for f in fields
        for path in (f.path, *f.fallbacks)
        for part in path
    }
    | {"message", "eventType", "callId", "callSession", "phone_number", "phoneNumber"}
    | {"ended_reason", "endedReason", "duration_seconds", "durationSeconds"}
    | {"recording_url", "recordingUrl", "messages", "orgId", "toolWithToolCallList"}
)
# Containers whose every field is optional: nulling one is still a valid report.
OPTIONAL_CONTAINERS: dict[SourceFormat, tuple[tuple[str, ...], ...]] = {
    "FLAT": (("recordings",), ("analysis",)),
    "NESTED_CAMEL": (("message", "phoneNumber"), ("message", "customer")),
    "NESTED_SNAKE": (("message", "phone_number"), ("message", "customer")),
    "VAPI": (("message", "phoneNumber"), ("message", "customer"), ("message", "artifact")),
}
_MIN_TIME = datetime(2000, 1, 2, tzinfo=UTC)
_MAX_TIME = datetime(2099, 12, 30, tzinfo=UTC)
_REQUEST_ID = "0123456789abcdef0123456789abcdef"
_RECEIVED_AT_MS = 1_765_000_000_000

# Modest example counts: the whole file stays well under 20 s.
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies ---------------------------------------------------------------------------

finite_floats = st.floats(allow_nan=False, allow_infinity=False)
int64s = st.integers(jsonvalue.INT64_MIN, jsonvalue.INT64_MAX)
json_scalars = st.none() | st.booleans() | int64s | finite_floats | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=6)
extra_keys = st.text(min_size=1, max_size=12).filter(lambda key: key not in RESERVED)


@st.composite
def iso_timestamps(draw: st.DrawFn) -> str:
    """A zoned ISO-8601 time in the accepted window, spelled the ways senders spell it."""
    offset = timedelta(minutes=draw(st.integers(-14 * 60, 14 * 60)))
    moment = draw(st.datetimes(_MIN_TIME.replace(tzinfo=None), _MAX_TIME.replace(tzinfo=None)))
    local = moment.replace(tzinfo=UTC).astimezone(timezone(offset))
    spelling = draw(st.sampled_from(["iso", "iso-ms", "z", "z-ms"]))
    if spelling == "iso":
        return local.isoformat()
    if spelling == "iso-ms":
        return local.isoformat(timespec="milliseconds")
    utc = local.astimezone(UTC)
    if spelling == "z":
        return utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    return utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")


epoch_ms = st.integers(int(_MIN_TIME.timestamp() * 1000), int(_MAX_TIME.timestamp() * 1000))
durations = (
    st.integers(0, jsonvalue.INT64_MAX)
    | st.floats(min_value=0, allow_nan=False, allow_infinity=False)
    | st.just(-0.0)
)


def _value_for(name: str, source_format: SourceFormat) -> st.SearchStrategy[Any]:
    """What a sender may put in the field that becomes canonical field `name`."""
    if name == "call_id":
        return st.text(min_size=1, max_size=40).filter(str.strip)
    if name == "event_time":
        return epoch_ms if source_format == "FLAT" else (iso_timestamps() | epoch_ms)
    if name in ("started_at", "ended_at"):
        return iso_timestamps() | epoch_ms
    if name in ("duration_seconds", "cost"):
        return durations
    if name == "costs_json":
        return st.lists(json_objects, max_size=3)
    if name == "success_evaluation":
        return st.booleans() | int64s | finite_floats | st.text(max_size=20)
    if name in ("structured_data_json", "user_metadata_json"):
        return json_objects
    return st.text(max_size=40)


def _set(payload: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = payload
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def _delete(payload: dict[str, Any], path: tuple[str, ...]) -> None:
    node: Any = payload
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)


@st.composite
def valid_reports(draw: st.DrawFn, source_format: SourceFormat) -> dict[str, Any]:
    payload: dict[str, Any] = copy.deepcopy(FIXTURES[source_format])
    for field in FIELDS[source_format]:
        if field.name == "event_type":
            continue
        if field.required:
            action = draw(st.sampled_from(["keep", "replace"]))
        else:
            action = draw(st.sampled_from(["keep", "replace", "null", "delete"]))
        if action == "replace":
            _set(payload, field.path, draw(_value_for(field.name, source_format)))
        elif action == "null":
            _set(payload, field.path, None)
        elif action == "delete":
            _delete(payload, field.path)
    for container in OPTIONAL_CONTAINERS[source_format]:
        if draw(st.integers(0, 9)) == 0:
            _set(payload, container, None)
    found = objects(payload)
    for _ in range(draw(st.integers(0, 4))):
        target = draw(st.sampled_from(found))
        target.setdefault(draw(extra_keys), draw(json_values))
    return payload


any_valid_report = st.sampled_from(list(FIXTURES)).flatmap(valid_reports)


@st.composite
def status_updates(draw: st.DrawFn) -> dict[str, Any]:
    """Other event types, flat or nested, with arbitrary extra content."""
    event_type = draw(st.sampled_from(["status-update", "hang", "speech-update"]))
    payload: dict[str, Any]
    if draw(st.booleans()):
        payload = copy.deepcopy(STATUS_UPDATE) | {"eventType": event_type}
    else:
        payload = {
            "message": {
                "type": event_type,
                "call": {"id": draw(_value_for("call_id", "NESTED_CAMEL"))},
                "timestamp": draw(iso_timestamps() | epoch_ms),
            }
        }
    for _ in range(draw(st.integers(0, 3))):
        draw(st.sampled_from(objects(payload))).setdefault(draw(extra_keys), draw(json_values))
    return payload


@st.composite
def broken_reports(draw: st.DrawFn) -> Any:
    """A valid report with one value anywhere in it replaced by arbitrary JSON (or removed)."""
    payload = draw(any_valid_report)
    target = draw(st.sampled_from(objects(payload)))
    if not target:
        return payload
    key = draw(st.sampled_from(sorted(target)))
    if draw(st.booleans()):
        del target[key]
    else:
        target[key] = draw(json_values)
    return payload


_interesting_strings = st.sampled_from(
    [
        "end-of-call-report",
        "status-update",
        "tool-calls",
        "assistant-request",
        "2025-12-13T12:05:30.000Z",
        "2025-12-13T12:05:30",
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59-14:00",
        "",
        " ",
    ]
)
# JSON objects whose keys are mostly the ones the normalisers look up, so random input gets
# past format detection into the field converters.
report_shaped = st.recursive(
    json_scalars | _interesting_strings | epoch_ms,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(sorted(RESERVED)) | st.text(max_size=4), children, max_size=6
        )
    ),
    max_leaves=24,
)
any_json = json_values | report_shaped | broken_reports() | status_updates()


# -- helpers ------------------------------------------------------------------------------


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _normalise(payload: Any) -> Normalised:
    return normalise(payload, received_at_ms=_RECEIVED_AT_MS, request_id=_REQUEST_ID)


def _ints_in_range(value: Any) -> bool:
    return all(
        jsonvalue.INT64_MIN <= node <= jsonvalue.INT64_MAX
        for node in _leaves(value)
        if isinstance(node, int) and not isinstance(node, bool)
    )


def _leaves(value: Any) -> list[Any]:
    out: list[Any] = []
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        else:
            out.append(node)
    return out


# -- properties ---------------------------------------------------------------------------


@FAST
@given(any_json)
# A nested event type that is not a string (schemathesis found a list giving a 500).
@example({"message": {"type": ["end-of-call-report"]}})
@example({"message": {"type": {"name": "end-of-call-report"}, "call": {}}})
def test_normalise_accepts_or_rejects_any_json_and_never_crashes(payload: Any) -> None:
    rejected: InvalidReport | None = None
    try:
        result = _normalise(payload)
    except InvalidReport as exc:
        rejected = exc
    if rejected is not None:
        event("rejected")
        assert rejected.pointer == "" or rejected.pointer.startswith("/")
        return
    event(f"accepted as {result.kind}")
    assert isinstance(result, Normalised)


@FAST
@given(any_json)
def test_whatever_normalise_accepts_fits_the_schema_and_round_trips(payload: Any) -> None:
    before = _canonical(payload)
    try:
        result = _normalise(payload)
    except InvalidReport:
        return
    if result.kind == "report":
        assert result.record is not None
        assert _canonical(denormalise(through_avro(result.record))) == before
    elif result.kind == "event":
        assert result.record is not None
        decoded = through_avro(result.record, FLIREO_EVENT)
        assert _canonical(orjson.loads(decoded["body_json"])) == before


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(list(FIXTURES)).flatmap(lambda fmt: valid_reports(fmt).map(lambda p: (fmt, p)))
)
def test_valid_reports_round_trip_exactly_through_avro(case: tuple[SourceFormat, Any]) -> None:
    source_format, payload = case
    expected = _canonical(payload)  # taken first: normalise must not touch its input either

    result = _normalise(payload)

    assert result.kind == "report"
    assert result.record is not None
    flat = source_format == "FLAT"
    assert result.call_id == (payload["callId"] if flat else payload["message"]["call"]["id"])
    decoded = through_avro(result.record)
    assert _canonical(denormalise(decoded)) == expected
    assert _canonical(CallReport.from_record(decoded).source_payload()) == expected
    assert _canonical(payload) == expected
    if flat:
        assert result.source_format == "FLAT"


@FAST
@given(
    st.binary(max_size=64)
    | json_values.map(orjson.dumps)
    | st.builds(
        lambda digits, sign: f'{{"n": {sign}{digits}}}'.encode(),
        st.text("0123456789", min_size=17, max_size=30),
        st.sampled_from(["", "-"]),
    )
    | st.builds(lambda value, cut: orjson.dumps(value)[:cut], json_values, st.integers(0, 40)),
    st.integers(1, 70),
)
# Top-level scalars once crashed check_bounds with a TypeError (a 500 instead of a 4xx).
@example(b"null", 1)
@example(b'"end-of-call-report"', 64)
@example(b"1e300", 64)
def test_jsonvalue_parse_returns_a_bounded_value_or_rejects(body: bytes, max_depth: int) -> None:
    try:
        value = jsonvalue.parse(body, max_depth=max_depth)
    except InvalidReport:
        return
    assert _ints_in_range(value)
    assert orjson.loads(orjson.dumps(value)) == value


def test_parse_takes_top_level_scalars_and_refuses_only_wide_integers() -> None:
    assert jsonvalue.parse(b'"end-of-call-report"', max_depth=4) == "end-of-call-report"
    assert jsonvalue.parse(b"null", max_depth=4) is None
    assert jsonvalue.parse(b"1e300", max_depth=4) == 1e300
    assert jsonvalue.parse(b"9223372036854775807", max_depth=4) == jsonvalue.INT64_MAX
    with pytest.raises(InvalidReport, match="signed 64-bit"):
        jsonvalue.parse(b"9223372036854775808", max_depth=4)
