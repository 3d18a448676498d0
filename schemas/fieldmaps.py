"""Which format a payload is, and where each canonical field sits in it.

Formats (docs/payload-formats.md has the full table of what lands where):

* FLAT: Flireo's oldest docs (`eventType`, `callId`, `eventTimestamp`, ...). Its `analysis` is
  a Vapi-style wrapper `{summary, structuredData, successEvaluation}`.
* NESTED_CAMEL / NESTED_SNAKE: Flireo's current `{"message": {...}}` shape, spelled in
  camelCase by one version of the docs and in snake_case by another (and by the SDK). Its
  `analysis` is the user-defined object itself, with no wrapper.
* VAPI: the nested shape of Vapi, which Flireo's follows, with more fields: `analysis` is the
  wrapper again, transcript and recordings sit under `artifact`, and facts such as
  `endedReason` are repeated inside `call`.

Bare or wrapper `analysis` is decided from the outer shape, never from the keys of
`analysis`: a customer's own schema may well have a key called `summary` or `structuredData`.
"""

from __future__ import annotations

from typing import Any, Literal

from schemas.converters import (
    Field,
    array_json,
    call_id,
    epoch_ms,
    event_type,
    fields,
    json_type,
    number,
    object_json,
    scalar,
    string,
    timestamp,
)
from schemas.errors import InvalidReport

SourceFormat = Literal["FLAT", "NESTED_CAMEL", "NESTED_SNAKE", "VAPI"]

# Keys only the snake_case docs use; any of them marks a nested payload as snake_case (the
# OpenAPI document tells the formats apart by the same keys).
SNAKE_CASE_MARKERS = ("phone_number", "duration_seconds", "ended_reason", "recording_url")
CAMEL_CASE_MARKERS = ("phoneNumber", "durationSeconds", "endedReason", "recordingUrl")
# Flireo documents `durationSeconds` / `duration_seconds` and `summary` as always present
# on its nested end-of-call-report; Vapi has neither (its summary is `analysis.summary`).
FLIREO_NESTED_KEYS = ("durationSeconds", "duration_seconds", "summary")
# Vapi's required report fields (`artifact`, `endedReason`) and keys only Vapi documents.
VAPI_MESSAGE_KEYS = ("artifact", "endedReason", "toolWithToolCallList", "startedAt", "costs")
# Vapi's Call object always has `orgId`; Flireo's `call` is {id, type, status}.
VAPI_CALL_KEYS = ("orgId",)
# Flireo documents exactly four event types; these come from Vapi only.
VAPI_ONLY_TYPES = frozenset(
    {
        "transcript",
        "hang",
        "conversation-update",
        "speech-update",
        "user-interrupted",
        "model-output",
        "transfer-update",
        "transfer-destination-request",
        "phone-call-control",
        "knowledge-base-request",
        "language-change-detected",
        "voice-input",
        "voice-request",
    }
)
# What a Vapi-style analysis wrapper holds, and the JSON type of each part.
WRAPPER_PARTS: dict[str, type] = {
    "summary": str,
    "structuredData": dict,
    "structuredDataMulti": list,
    "successEvaluation": str,
}

_FLAT = fields(
    (("eventType",), "event_type", event_type),
    (("callId",), "call_id", call_id),
    # Flat tool-calls spells it `eventTime`: read it there when `eventTimestamp` is absent.
    (("eventTimestamp",), "event_time", epoch_ms, ("eventTime",)),
    (("fromCaller",), "from_number", string),
    (("toAssistant",), "to_number", string),
    (("transcriptText",), "transcript", string),
    (("summaryText",), "summary", string),
    (("recordings", "linkStereo"), "recording_url", string),
    (("callLengthSeconds",), "duration_seconds", number),
    (("userMetadata",), "user_metadata_json", object_json),
    # The flat `analysis` is the wrapper: its parts are typed one by one.
    (("analysis", "summary"), "analysis_summary", string),
    (("analysis", "structuredData"), "structured_data_json", object_json),
    (("analysis", "successEvaluation"), "success_evaluation", scalar),
)


def _nested(snake: bool) -> tuple[Field, ...]:
    def key(camel: str, snake_name: str) -> str:
        return snake_name if snake else camel

    message = "message"
    phone = key("phoneNumber", "phone_number")
    # The REST call object names it `end_reason`; expect it to reach the webhook too.
    ended_reason_fallbacks = ((message, "end_reason"),) if snake else ()
    return fields(
        ((message, "type"), "event_type", event_type),
        ((message, "call", "id"), "call_id", call_id),
        ((message, "timestamp"), "event_time", timestamp),
        ((message, "call", "type"), "call_type", string),
        ((message, "call", "status"), "call_status", string),
        (
            (message, key("endedReason", "ended_reason")),
            "ended_reason",
            string,
            *ended_reason_fallbacks,
        ),
        ((message, "customer", "number"), "from_number", string),
        ((message, phone, "number"), "to_number", string),
        ((message, phone, "name"), "assistant_name", string),
        ((message, key("durationSeconds", "duration_seconds")), "duration_seconds", number),
        ((message, "transcript"), "transcript", string),
        ((message, "summary"), "summary", string),
        ((message, key("recordingUrl", "recording_url")), "recording_url", string),
        # Flireo's nested `analysis` is the user-defined object itself, no wrapper.
        ((message, "analysis"), "structured_data_json", object_json),
        ((message, key("startedAt", "started_at")), "started_at", timestamp),
        ((message, key("endedAt", "ended_at")), "ended_at", timestamp),
        ((message, "assistant", "id"), "agent_id", string),
        ((message, "assistant", "name"), "agent_name", string),
        ((message, "assistant", "metadata"), "user_metadata_json", object_json),
    )


def _vapi() -> tuple[Field, ...]:
    message, call, artifact, analysis = "message", ("message", "call"), "artifact", "analysis"
    return fields(
        ((message, "type"), "event_type", event_type),
        ((*call, "id"), "call_id", call_id),
        ((message, "timestamp"), "event_time", timestamp),
        ((*call, "type"), "call_type", string),
        ((*call, "status"), "call_status", string),
        ((message, "endedReason"), "ended_reason", string, (*call, "endedReason")),
        ((message, "customer", "number"), "from_number", string, (*call, "customer", "number")),
        ((message, "phoneNumber", "number"), "to_number", string),
        ((message, "phoneNumber", "name"), "assistant_name", string),
        ((message, artifact, "transcript"), "transcript", string),
        # Vapi's only summary is the analysis one: it is the call's summary too.
        ((message, analysis, "summary"), "summary", string),
        (
            (message, artifact, "recordingUrl"),
            "recording_url",
            string,
            (message, artifact, "stereoRecordingUrl"),
            (message, artifact, "recording", "stereoUrl"),
            (message, artifact, "recording", "mono", "combinedUrl"),
        ),
        ((message, analysis, "summary"), "analysis_summary", string),
        ((message, analysis, "structuredData"), "structured_data_json", object_json),
        ((message, analysis, "successEvaluation"), "success_evaluation", scalar),
        ((message, "assistant", "metadata"), "user_metadata_json", object_json),
        ((message, "startedAt"), "started_at", timestamp, (*call, "startedAt")),
        ((message, "endedAt"), "ended_at", timestamp, (*call, "endedAt")),
        ((message, "cost"), "cost", number, (*call, "cost")),
        ((message, "costs"), "costs_json", array_json, (*call, "costs")),
        ((*call, "assistantId"), "agent_id", string),
        ((message, "assistant", "name"), "agent_name", string),
    )


FIELDS: dict[SourceFormat, tuple[Field, ...]] = {
    "FLAT": _FLAT,
    "NESTED_CAMEL": _nested(snake=False),
    "NESTED_SNAKE": _nested(snake=True),
    "VAPI": _vapi(),
}
# Every optional typed field of the report; a format without one leaves it null.
REPORT_FIELD_NAMES = tuple(
    dict.fromkeys(f.name for table in FIELDS.values() for f in table if not f.required)
)


def detect_format(payload: Any) -> SourceFormat:
    """The format, from the payload's outer shape (see the module docstring)."""
    if not isinstance(payload, dict):
        raise InvalidReport("", f"body must be a JSON object, not {json_type(payload)}")
    message = payload.get("message")
    if message is None and ("eventType" in payload or "callId" in payload):
        return "FLAT"
    if message is None:
        raise InvalidReport(
            "", "neither the nested format (a `message` object) nor the flat format (`eventType`)"
        )
    if not isinstance(message, dict):
        raise InvalidReport("/message", f"must be an object, not {json_type(message)}")
    # 1. Flireo's always-present report keys: Flireo nested, so `analysis` is bare even when
    #    it happens to hold a `summary` key.
    if any(marker in message for marker in FLIREO_NESTED_KEYS):
        return _spelling(message)
    # 2. Vapi's own keys, or an event type only Vapi sends: Vapi, so `analysis` is a wrapper.
    call, event_type = message.get("call"), message.get("type")
    if (
        any(marker in message for marker in VAPI_MESSAGE_KEYS)
        or (isinstance(call, dict) and any(marker in call for marker in VAPI_CALL_KEYS))
        # A list or object is unhashable: left to the field checks, which name it in a 422.
        or (isinstance(event_type, str) and event_type in VAPI_ONLY_TYPES)
    ):
        return "VAPI"
    # 3. Only a minimal body (a test tool's) leaves the envelope ambiguous: then `analysis`
    #    counts as a wrapper only if it has nothing but wrapper parts, each of its type.
    if is_wrapper_shaped(message.get("analysis")):
        return "VAPI"
    return _spelling(message)


def is_wrapper_shaped(analysis: Any) -> bool:
    if not isinstance(analysis, dict):
        return False
    if not ("structuredData" in analysis or "successEvaluation" in analysis):
        return False
    return all(
        key in WRAPPER_PARTS and isinstance(value, WRAPPER_PARTS[key])
        for key, value in analysis.items()
    )


def _spelling(message: dict[str, Any]) -> SourceFormat:
    snake = sum(marker in message for marker in SNAKE_CASE_MARKERS)
    camel = sum(marker in message for marker in CAMEL_CASE_MARKERS)
    return "NESTED_SNAKE" if snake > camel else "NESTED_CAMEL"


Path = tuple[str, ...]
# Where a status update's facts sit, first place first (schemas.events reads them from the
# kept body). Flat names the call `callSession` (the normaliser reads it) and its debugging
# status carries the error as `debugging-artifact`; Flireo's nested updates put the status
# in `call.status` and may add `error`; Vapi's put it in `message.status` with `endedReason`
# beside it, and repeat both inside `call`. Every nested format gets every nested spelling:
# an update is too small for its format to be told apart reliably.
_NESTED_STATUS: dict[str, tuple[Path, ...]] = {
    "status": (("message", "status"), ("message", "call", "status")),
    "ended_reason": tuple(
        (*where, name)
        for where in (("message",), ("message", "call"))
        for name in ("endedReason", "ended_reason", "end_reason")
    ),
    "error": (("message", "error"),),
    "from_number": (("message", "customer", "number"), ("message", "call", "customer", "number")),
}
STATUS_UPDATE_PATHS: dict[SourceFormat, dict[str, tuple[Path, ...]]] = {
    "FLAT": {
        "status": (("status",),),
        "ended_reason": (("endedReason",),),
        "error": (("error",), ("debugging-artifact",)),
        "from_number": (("fromCaller",),),
    },
    "NESTED_CAMEL": _NESTED_STATUS,
    "NESTED_SNAKE": _NESTED_STATUS,
    "VAPI": _NESTED_STATUS,
}
