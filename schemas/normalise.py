"""Map each Flireo payload format onto the canonical records, and back.

The formats, how one is told from another and where each field sits in each are in
schemas/fieldmaps.py; the value converters in schemas/converters.py.

A typed field is "verbatim" when it is written back to the one place it was read from.
Whatever the input holds beyond what the verbatim fields carry (unknown keys, nulls, a
timestamp spelled differently from how it would be re-rendered, the messages the typed turns
were read from, a value read from a fallback place) goes into `extra_json` as the
difference between the input and its rebuild, so `denormalise(normalise(x).record) == x`
for every valid `x`. Fields that are not verbatim for a record (read from a fallback, or an
event time the sender did not give) are named in its provenance, so the rebuild leaves them
out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import orjson

from schemas import jsonvalue
from schemas.converters import (
    EPOCH,
    MISSING,
    Converter,
    Field,
    call_id,
    epoch_ms,
    event_type,
    lookup,
    peek,
    pointer,
    timestamp,
)

# `X as X` re-exports X: the ingress's OpenAPI document and metrics import these from here.
from schemas.converters import MAX_CALL_ID_LENGTH as MAX_CALL_ID_LENGTH
from schemas.converters import MAX_EVENT_TIME_MS as MAX_EVENT_TIME_MS
from schemas.converters import MIN_EVENT_TIME_MS as MIN_EVENT_TIME_MS
from schemas.errors import InvalidReport
from schemas.fieldmaps import CAMEL_CASE_MARKERS as CAMEL_CASE_MARKERS
from schemas.fieldmaps import FIELDS as FIELDS
from schemas.fieldmaps import REPORT_FIELD_NAMES, detect_format
from schemas.fieldmaps import SNAKE_CASE_MARKERS as SNAKE_CASE_MARKERS
from schemas.fieldmaps import SourceFormat as SourceFormat
from schemas.store import END_OF_CALL_REPORT, FLIREO_EVENT
from schemas.turns import transcript_turns

Kind = Literal["report", "event", "request"]

END_OF_CALL_REPORT_TYPE = "end-of-call-report"
# These expect an answer the platform acts on within seconds (an assistant configuration,
# tool results, a transfer target, documents). They are published like any other event and
# then answered by the ingress (ingress/replies.py) with what the sender documents as neutral.
REQUEST_RESPONSE_TYPES = frozenset(
    {"assistant-request", "tool-calls", "transfer-destination-request", "knowledge-base-request"}
)


@dataclass(frozen=True, slots=True)
class Normalised:
    kind: Kind
    event_type: str
    source_format: SourceFormat
    call_id: str | None
    schema_name: str
    record: dict[str, Any]


def normalise(payload: Any, *, received_at_ms: int, request_id: str) -> Normalised:
    """Validate one webhook payload and build the record to publish (or say why not)."""
    source_format = detect_format(payload)
    fields = FIELDS[source_format]
    type_field = fields[0]
    raw_type = lookup(payload, type_field.path)
    if raw_type is MISSING or raw_type is None:
        raise InvalidReport(type_field.pointer, "is required")
    kind_of_event = event_type(raw_type, type_field.pointer)
    provenance: dict[str, Any] = {
        "format": source_format,
        "received_at": received_at_ms,
        "request_id": request_id,
    }
    if kind_of_event != END_OF_CALL_REPORT_TYPE:
        kind: Kind = "request" if kind_of_event in REQUEST_RESPONSE_TYPES else "event"
        return _event(payload, kind, kind_of_event, source_format, provenance)

    record, derived = _typed(payload, fields)
    if record["event_time"] is None:
        # Keyed by call id, ordered by receipt: better than losing the report for good.
        record["event_time"] = received_at_ms
        provenance["event_time_source"] = "received"
    else:
        provenance["event_time_source"] = "sent"
    turns = transcript_turns(payload, source_format, record["transcript"])
    record["transcript_turns_json"] = None if turns is None else orjson.dumps(turns).decode()
    if record["duration_seconds"] is None and source_format == "VAPI":
        # Vapi has no duration field: its report says when the call started and ended.
        record["duration_seconds"] = _seconds_between(record["started_at"], record["ended_at"])
    provenance["derived_fields"] = derived or None
    record["source"] = provenance
    extra = jsonvalue.difference(payload, _rebuild(record, fields))
    record["extra_json"] = orjson.dumps(extra).decode() if extra else None
    return Normalised(
        "report", kind_of_event, source_format, record["call_id"], END_OF_CALL_REPORT, record
    )


def _typed(payload: dict[str, Any], fields: tuple[Field, ...]) -> tuple[dict[str, Any], list[str]]:
    """Each field's value (None when absent), and the names of those read from a fallback."""
    record: dict[str, Any] = dict.fromkeys(REPORT_FIELD_NAMES)
    derived: list[str] = []
    for field in fields:
        raw = lookup(payload, field.path)
        if raw is not MISSING and raw is not None:
            record[field.name] = field.convert(raw, field.pointer)
            continue
        if field.required:
            raise InvalidReport(field.pointer, "is required")
        fallback = _fallback(payload, field)
        if fallback is not MISSING:
            record[field.name] = fallback
            derived.append(field.name)
    return record, derived


def _fallback(payload: dict[str, Any], field: Field) -> Any:
    """The first fallback place that holds a value the field can take. A value that does not
    convert is just not used: it stays in extra_json, and nothing promised it was typed."""
    for path in field.fallbacks:
        raw = peek(payload, path)
        if raw is MISSING or raw is None:
            continue
        try:
            return field.convert(raw, pointer(path))
        except InvalidReport:
            continue
    return MISSING


def _seconds_between(started: int | None, ended: int | None) -> int | float | None:
    if started is None or ended is None or ended < started:
        return None
    millis = ended - started
    return millis // 1000 if millis % 1000 == 0 else millis / 1000


def _event(
    payload: dict[str, Any],
    kind: Kind,
    event_name: str,
    source_format: SourceFormat,
    provenance: dict[str, Any],
) -> Normalised:
    # The flat docs name the call `callSession` in status-update and time tool-calls with
    # `eventTime`; assistant-request carries neither a call id nor a time.
    if source_format == "FLAT":
        call_id_paths: tuple[tuple[str, ...], ...] = (("callId",), ("callSession",))
        time_paths: tuple[tuple[str, ...], ...] = (("eventTimestamp",), ("eventTime",))
        convert = epoch_ms
    else:
        call_id_paths, time_paths = (("message", "call", "id"),), (("message", "timestamp"),)
        convert = timestamp
    the_call_id = _first(payload, call_id_paths, call_id)
    record = {
        "event_type": event_name,
        "call_id": the_call_id,
        "event_time": _first(payload, time_paths, convert),
        "body_json": orjson.dumps(payload).decode(),
        "source": provenance,
    }
    return Normalised(kind, event_name, source_format, the_call_id, FLIREO_EVENT, record)


def _first(payload: dict[str, Any], paths: tuple[tuple[str, ...], ...], convert: Converter) -> Any:
    """The value at the first of `paths` that holds one, converted; None when none does."""
    for path in paths:
        value = lookup(payload, path)
        if value is not MISSING and value is not None:
            return convert(value, pointer(path))
    return None


def _rebuild(record: dict[str, Any], fields: tuple[Field, ...]) -> dict[str, Any]:
    source = record["source"]
    skip = set(source.get("derived_fields") or ())
    if source.get("event_time_source") == "received":
        skip.add("event_time")
    out: dict[str, Any] = {}
    for field in fields:
        value = record.get(field.name)
        if value is None or field.name in skip:
            continue
        if isinstance(value, datetime):
            value = (value - EPOCH) // timedelta(milliseconds=1)
        node = out
        for part in field.path[:-1]:
            node = node.setdefault(part, {})
        node[field.path[-1]] = field.render(value)
    return out


def denormalise(record: dict[str, Any]) -> dict[str, Any]:
    """The payload exactly as the sender posted it, from a decoded EndOfCallReport record
    of any schema version."""
    source_format = record["source"]["format"]
    if source_format not in FIELDS:
        raise ValueError(f"record from an unknown source format {source_format!r}")
    rebuilt = _rebuild(record, FIELDS[source_format])
    extra = record.get("extra_json")
    return jsonvalue.merge(rebuilt, orjson.loads(extra)) if extra else rebuilt
