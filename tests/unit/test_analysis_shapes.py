"""Bare or wrapper `analysis`, over generated input: the envelope decides, and no key is lost.

Flat Flireo and Vapi send `analysis` as a wrapper {summary, structuredData,
successEvaluation, ...}; nested Flireo sends the customer's own object, which may well have
keys of the same names. Whatever the analysis holds, each of its keys ends up in a typed
field or in extra_json, and the payload rebuilds exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import jsonvalue
from schemas.errors import InvalidReport
from schemas.fieldmaps import WRAPPER_PARTS, detect_format, is_wrapper_shaped
from schemas.normalise import Normalised, denormalise, normalise

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# What each wrapper part becomes in the canonical record, and how to read it back.
TYPED_PARTS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "summary": ("analysis_summary", lambda v: v),
    "structuredData": ("structured_data_json", orjson.loads),
    "successEvaluation": ("success_evaluation", lambda v: v),
}

scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
# Mostly the names that make the two readings differ, with the types a wrapper gives them.
part_values = {
    "summary": st.text(max_size=12),
    "structuredData": st.dictionaries(st.text(max_size=5), values, max_size=3),
    "structuredDataMulti": st.lists(st.dictionaries(st.text(max_size=3), scalars), max_size=2),
    "successEvaluation": st.sampled_from(["true", "false", "8", "Good"]),
}
keys = st.sampled_from([*WRAPPER_PARTS, "sentiment", "hoofdonderwerp"]) | st.text(max_size=6)


@st.composite
def analyses(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in draw(st.lists(keys, max_size=5, unique=True)):
        typed = key in part_values and draw(st.integers(0, 3)) > 0
        out[key] = draw(part_values[key] if typed else values)
    return out


FLAT: dict[str, Any] = {
    "eventType": "end-of-call-report",
    "callId": "c-1",
    "eventTimestamp": 1760005432100,
}
FLIREO: dict[str, Any] = {
    "type": "end-of-call-report",
    "call": {"id": "c-2"},
    "durationSeconds": 12,
}
VAPI: dict[str, Any] = {
    "type": "end-of-call-report",
    "call": {"id": "c-3"},
    "endedReason": "hangup",
}
MINIMAL: dict[str, Any] = {"type": "end-of-call-report", "call": {"id": "c-4"}}


def _envelope(kind: str, analysis: dict[str, Any]) -> dict[str, Any]:
    if kind == "flat":
        return copy.deepcopy(FLAT) | {"analysis": analysis}
    base = {"flireo": FLIREO, "vapi": VAPI, "minimal": MINIMAL}[kind]
    return {"message": copy.deepcopy(base) | {"analysis": analysis}}


def _normalise(payload: dict[str, Any]) -> Normalised | InvalidReport:
    try:
        return normalise(payload, received_at_ms=1_765_000_000_000, request_id="r")
    except InvalidReport as exc:
        return exc


@FAST
@given(st.sampled_from(["flat", "flireo", "vapi", "minimal"]), analyses())
def test_every_analysis_key_lands_in_a_typed_field_or_extra_json(
    kind: str, analysis: dict[str, Any]
) -> None:
    payload = _envelope(kind, analysis)
    result = _normalise(payload)
    if isinstance(result, InvalidReport):
        # Only a wrapper part of the wrong type is refused, and the pointer says which.
        assert "/analysis/" in result.pointer, result
        return
    record = result.record
    extra = orjson.loads(record["extra_json"]) if record["extra_json"] else {}
    extra_analysis = (extra if kind == "flat" else extra.get("message", {})).get("analysis", {})
    if result.source_format in ("NESTED_CAMEL", "NESTED_SNAKE"):
        # Bare: the whole object is the customer's structured data.
        assert jsonvalue.same(orjson.loads(record["structured_data_json"]), analysis)
    else:
        for key, value in analysis.items():
            in_extra = key in extra_analysis and jsonvalue.same(extra_analysis[key], value)
            typed = False
            if key in TYPED_PARTS and record[TYPED_PARTS[key][0]] is not None:
                name, read = TYPED_PARTS[key]
                typed = jsonvalue.same(read(record[name]), value)
            assert typed or in_extra, key
    assert denormalise(record) == payload


@FAST
@given(analyses())
def test_the_envelope_not_the_analysis_keys_decides_bare_or_wrapper(
    analysis: dict[str, Any],
) -> None:
    assert detect_format(_envelope("flat", analysis)) == "FLAT"
    assert detect_format(_envelope("flireo", analysis)) == "NESTED_CAMEL"
    assert detect_format(_envelope("vapi", analysis)) == "VAPI"
    # Only a minimal body leaves it to the analysis: a wrapper only when it is nothing else.
    minimal = detect_format(_envelope("minimal", analysis))
    assert (minimal == "VAPI") == is_wrapper_shaped(analysis)


def test_a_bare_analysis_with_a_summary_key_stays_user_data() -> None:
    analysis = {"summary": "bestelling", "structuredData": {"x": 1}, "successEvaluation": "true"}

    result = normalise(
        _envelope("flireo", analysis), received_at_ms=1_765_000_000_000, request_id="r"
    )

    assert orjson.loads(result.record["structured_data_json"]) == analysis
    assert result.record["analysis_summary"] is None
    assert result.record["success_evaluation"] is None
