"""Map each Flireo payload format onto the canonical records, and back.

Formats (see docs/formats.md):

* FLAT: the older documented shape (`eventType`, `callId`, `eventTimestamp`, ...).
* NESTED_CAMEL / NESTED_SNAKE: the current shape, `{"message": {"type", "call": {"id"}, ...}}`,
  spelled in camelCase in one version of Flireo's docs and snake_case in another.

Every field has exactly one source path per format. Whatever the input holds beyond what
the typed fields carry verbatim (unknown keys, nulls, a timestamp spelled differently from
how it would be re-rendered) goes into `extra_json` as the difference between the input and
its rebuild, so `denormalise(normalise(x).record) == x` for every valid `x`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson

from schemas import jsonvalue
from schemas.errors import InvalidReport
from schemas.store import END_OF_CALL_REPORT, FLIREO_EVENT

SourceFormat = Literal["FLAT", "NESTED_CAMEL", "NESTED_SNAKE"]
Kind = Literal["report", "event", "request"]

END_OF_CALL_REPORT_TYPE = "end-of-call-report"
# These expect an answer the platform acts on within seconds (an assistant configuration,
# tool results, a transfer target). callstream cannot produce one, so it says so with a 4xx
# instead of acknowledging an answer it never gave.
REQUEST_RESPONSE_TYPES = frozenset(
    {"assistant-request", "tool-calls", "transfer-destination-request", "knowledge-base-request"}
)
_EVENT_TYPE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_CALL_ID_LENGTH = 256
# Sanity window for event times: 2000-01-01 .. 2100-01-01 in epoch milliseconds (the
# OpenAPI document states the same bounds).
MIN_EVENT_TIME_MS, MAX_EVENT_TIME_MS = 946_684_800_000, 4_102_444_800_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Normalised:
    kind: Kind
    event_type: str
    source_format: SourceFormat
    call_id: str | None
    schema_name: str | None  # None for request-response events, which are never published
    record: dict[str, Any] | None


# -- converters: (raw value, pointer) -> canonical value; and canonical -> raw ---------------

Converter = Callable[[Any, str], Any]
Renderer = Callable[[Any], Any]


def _string(value: Any, pointer: str) -> str:
    if not isinstance(value, str):
        raise InvalidReport(pointer, f"must be a string, not {_json_type(value)}")
    return value


def _call_id(value: Any, pointer: str) -> str:
    text = _string(value, pointer)
    if not text.strip():
        raise InvalidReport(pointer, "must not be empty")
    if len(text) > MAX_CALL_ID_LENGTH:
        raise InvalidReport(pointer, f"longer than {MAX_CALL_ID_LENGTH} characters")
    return text


def _event_type(value: Any, pointer: str) -> str:
    text = _string(value, pointer)
    if not _EVENT_TYPE.match(text):
        raise InvalidReport(pointer, "must be a lower-case event name such as end-of-call-report")
    return text


def _epoch_ms(value: Any, pointer: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidReport(
            pointer, f"must be an integer of epoch milliseconds, not {_json_type(value)}"
        )
    if not MIN_EVENT_TIME_MS <= value < MAX_EVENT_TIME_MS:
        raise InvalidReport(pointer, "epoch milliseconds outside 2000..2100")
    return value


def _timestamp(value: Any, pointer: str) -> int:
    """The nested format's ISO-8601 string; epoch milliseconds are accepted too."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _epoch_ms(value, pointer)
    text = _string(value, pointer)
    try:
        # RFC 3339 allows a lower-case t and z; the original spelling survives in extra_json.
        parsed = datetime.fromisoformat(text.upper())
    except ValueError:
        raise InvalidReport(pointer, "must be an ISO-8601 timestamp") from None
    if parsed.tzinfo is None:
        raise InvalidReport(pointer, "timestamp must carry a zone (Z or +hh:mm)")
    return _epoch_ms(round(parsed.timestamp() * 1000), pointer)


def _render_iso(ms: int) -> str:
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _number(value: Any, pointer: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidReport(pointer, f"must be a number, not {_json_type(value)}")
    if value < 0:
        raise InvalidReport(pointer, "must not be negative")
    return value


def _scalar(value: Any, pointer: str) -> bool | int | float | str:
    if not isinstance(value, bool | int | float | str):
        raise InvalidReport(
            pointer, f"must be a string, number or boolean, not {_json_type(value)}"
        )
    return value


def _object_json(value: Any, pointer: str) -> str:
    if not isinstance(value, dict):
        raise InvalidReport(pointer, f"must be an object, not {_json_type(value)}")
    return orjson.dumps(value).decode()


def _same(value: Any) -> Any:
    return value


def _from_json(text: Any) -> Any:
    return orjson.loads(text)


def _pointer(path: tuple[str, ...]) -> str:
    return "".join("/" + jsonvalue.escape(part) for part in path)


@dataclass(frozen=True, slots=True)
class _Field:
    path: tuple[str, ...]
    name: str
    convert: Converter
    render: Renderer = _same
    required: bool = False
    pointer: str = ""  # the JSON pointer of `path`, built once


def _fields(*spec: tuple[tuple[str, ...], str, Converter, Renderer, bool]) -> tuple[_Field, ...]:
    return tuple(_Field(*row, pointer=_pointer(row[0])) for row in spec)


_FLAT = _fields(
    (("eventType",), "event_type", _event_type, _same, True),
    (("callId",), "call_id", _call_id, _same, True),
    (("eventTimestamp",), "event_time", _epoch_ms, _same, True),
    (("fromCaller",), "from_number", _string, _same, False),
    (("toAssistant",), "to_number", _string, _same, False),
    (("transcriptText",), "transcript", _string, _same, False),
    (("summaryText",), "summary", _string, _same, False),
    (("recordings", "linkStereo"), "recording_url", _string, _same, False),
    (("callLengthSeconds",), "duration_seconds", _number, _same, False),
    (("userMetadata",), "user_metadata_json", _object_json, _from_json, False),
    (("analysis", "summary"), "analysis_summary", _string, _same, False),
    (("analysis", "structuredData"), "structured_data_json", _object_json, _from_json, False),
    (("analysis", "successEvaluation"), "success_evaluation", _scalar, _same, False),
)


def _nested(snake: bool) -> tuple[_Field, ...]:
    def key(camel: str, snake_name: str) -> str:
        return snake_name if snake else camel

    return _fields(
        (("message", "type"), "event_type", _event_type, _same, True),
        (("message", "call", "id"), "call_id", _call_id, _same, True),
        (("message", "timestamp"), "event_time", _timestamp, _render_iso, True),
        (("message", "call", "type"), "call_type", _string, _same, False),
        (("message", "call", "status"), "call_status", _string, _same, False),
        (("message", key("endedReason", "ended_reason")), "ended_reason", _string, _same, False),
        (("message", "customer", "number"), "from_number", _string, _same, False),
        (
            ("message", key("phoneNumber", "phone_number"), "number"),
            "to_number",
            _string,
            _same,
            False,
        ),
        (
            ("message", key("phoneNumber", "phone_number"), "name"),
            "assistant_name",
            _string,
            _same,
            False,
        ),
        (
            ("message", key("durationSeconds", "duration_seconds")),
            "duration_seconds",
            _number,
            _same,
            False,
        ),
        (("message", "transcript"), "transcript", _string, _same, False),
        (("message", "summary"), "summary", _string, _same, False),
        (("message", key("recordingUrl", "recording_url")), "recording_url", _string, _same, False),
        # Flireo's docs: `analysis` is the user-defined object itself, no structuredData wrapper.
        (("message", "analysis"), "structured_data_json", _object_json, _from_json, False),
    )


FIELDS: dict[SourceFormat, tuple[_Field, ...]] = {
    "FLAT": _FLAT,
    "NESTED_CAMEL": _nested(snake=False),
    "NESTED_SNAKE": _nested(snake=True),
}
# Keys only the snake_case docs use; any of them marks a nested payload as snake_case (the
# OpenAPI document tells the formats apart by the same keys).
SNAKE_CASE_MARKERS = ("phone_number", "duration_seconds", "ended_reason", "recording_url")
CAMEL_CASE_MARKERS = ("phoneNumber", "durationSeconds", "endedReason", "recordingUrl")


def detect_format(payload: Any) -> SourceFormat:
    if not isinstance(payload, dict):
        raise InvalidReport("", f"body must be a JSON object, not {_json_type(payload)}")
    message = payload.get("message")
    if message is None and ("eventType" in payload or "callId" in payload):
        return "FLAT"
    if message is None:
        raise InvalidReport(
            "", "neither the nested format (a `message` object) nor the flat format (`eventType`)"
        )
    if not isinstance(message, dict):
        raise InvalidReport("/message", f"must be an object, not {_json_type(message)}")
    snake = sum(marker in message for marker in SNAKE_CASE_MARKERS)
    camel = sum(marker in message for marker in CAMEL_CASE_MARKERS)
    return "NESTED_SNAKE" if snake > camel else "NESTED_CAMEL"


_MISSING = object()


def _lookup(payload: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = payload
    for depth, part in enumerate(path):
        if not isinstance(node, dict):
            if node is None:
                return _MISSING
            raise InvalidReport(
                _pointer(path[:depth]), f"must be an object, not {_json_type(node)}"
            )
        node = node.get(part, _MISSING)
        if node is _MISSING:
            return _MISSING
    return node


def normalise(payload: Any, *, received_at_ms: int, request_id: str) -> Normalised:
    """Validate one webhook payload and build the record to publish (or say why not)."""
    source_format = detect_format(payload)
    fields = FIELDS[source_format]
    event_type = _event_type(_required(payload, fields[0]), fields[0].pointer)
    provenance = {"format": source_format, "received_at": received_at_ms, "request_id": request_id}

    if event_type in REQUEST_RESPONSE_TYPES:
        return Normalised("request", event_type, source_format, None, None, None)
    if event_type != END_OF_CALL_REPORT_TYPE:
        return _generic_event(payload, event_type, source_format, provenance)

    record: dict[str, Any] = {}
    for field in fields:
        raw = _lookup(payload, field.path)
        if raw is _MISSING or raw is None:
            if field.required:
                raise InvalidReport(field.pointer, "is required")
            record[field.name] = None
            continue
        record[field.name] = field.convert(raw, field.pointer)
    record.setdefault("assistant_name", None)
    record.setdefault("ended_reason", None)
    record.setdefault("call_type", None)
    record.setdefault("call_status", None)
    extra = jsonvalue.difference(payload, _rebuild(record, fields))
    record["extra_json"] = orjson.dumps(extra).decode() if extra else None
    record["source"] = provenance
    return Normalised(
        "report", event_type, source_format, record["call_id"], END_OF_CALL_REPORT, record
    )


def _required(payload: dict[str, Any], field: _Field) -> Any:
    value = _lookup(payload, field.path)
    if value is _MISSING or value is None:
        raise InvalidReport(field.pointer, "is required")
    return value


def _generic_event(
    payload: dict[str, Any],
    event_type: str,
    source_format: SourceFormat,
    provenance: dict[str, Any],
) -> Normalised:
    # status-update names the call `callSession` in the flat docs.
    if source_format == "FLAT":
        call_id_path: tuple[str, ...] = ("callId",) if "callId" in payload else ("callSession",)
        time_path: tuple[str, ...] = ("eventTimestamp",)
    else:
        call_id_path, time_path = ("message", "call", "id"), ("message", "timestamp")
    raw_id = _lookup(payload, call_id_path)
    call_id = None if raw_id in (_MISSING, None) else _call_id(raw_id, _pointer(call_id_path))
    raw_time = _lookup(payload, time_path)
    convert = _epoch_ms if source_format == "FLAT" else _timestamp
    event_time = None if raw_time in (_MISSING, None) else convert(raw_time, _pointer(time_path))
    record = {
        "event_type": event_type,
        "call_id": call_id,
        "event_time": event_time,
        "body_json": orjson.dumps(payload).decode(),
        "source": provenance,
    }
    return Normalised("event", event_type, source_format, call_id, FLIREO_EVENT, record)


def _rebuild(record: dict[str, Any], fields: tuple[_Field, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in fields:
        value = record.get(field.name)
        if value is None:
            continue
        if isinstance(value, datetime):
            value = (value - EPOCH) // timedelta(milliseconds=1)
        node = out
        for part in field.path[:-1]:
            node = node.setdefault(part, {})
        node[field.path[-1]] = field.render(value)
    return out


def denormalise(record: dict[str, Any]) -> dict[str, Any]:
    """The payload exactly as the sender posted it, from a decoded EndOfCallReport record."""
    source_format = record["source"]["format"]
    if source_format not in FIELDS:
        raise ValueError(f"record from an unknown source format {source_format!r}")
    rebuilt = _rebuild(record, FIELDS[source_format])
    extra = record.get("extra_json")
    return jsonvalue.merge(rebuilt, orjson.loads(extra)) if extra else rebuilt


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
