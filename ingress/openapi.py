"""The ingress's OpenAPI 3.1 description, built in code and served at GET /openapi.json.

Built from the constants the handlers enforce (the normaliser's limits, event types and
format markers, the header names) and from the running settings (body limit, nesting depth,
signature tolerance, body timeout), so the description does not drift from the service;
tests/integration/test_openapi.py holds the running ingress to it with Schemathesis.
`python -m ingress.openapi` prints the description for the default settings.

Each payload shape is exclusive of the others (flat has no `message`; nested snake_case has
at least one snake_case marker key, nested camelCase has none), so `oneOf` holds exactly.
Fields are typed as the normaliser types them; unknown keys are allowed everywhere because
callstream keeps them (`extra_json`).
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from aiohttp import web

from core import __version__
from core.kafkasettings import KafkaSettings
from core.signing import SIGNATURE_HEADER, SIGNATURE_PREFIX, TIMESTAMP_HEADER, WEBHOOK_PATH
from ingress.auth import TOKEN_HEADER
from ingress.errors import PROBLEM_CONTENT_TYPE
from ingress.quarantine import QUARANTINE_HEADER
from ingress.settings import IngressSettings

# The normaliser's own marker keys and event-time window: the schema must tell the formats
# apart and bound times exactly as the normaliser does.
from schemas.normalise import (
    CAMEL_CASE_MARKERS,
    END_OF_CALL_REPORT_TYPE,
    MAX_CALL_ID_LENGTH,
    MAX_EVENT_TIME_MS,
    MIN_EVENT_TIME_MS,
    REQUEST_RESPONSE_TYPES,
    SNAKE_CASE_MARKERS,
)

PATH: Final = "/openapi.json"
JSON: Final = "application/json"
_SCHEMAS: Final = "#/components/schemas/"
_RESPONSES: Final = "#/components/responses/"


def _ref(name: str, components: str = _SCHEMAS) -> dict[str, str]:
    return {"$ref": components + name}


# Nullable: the normaliser treats an explicit null like an absent optional field.
_STRING: Final = {"type": ["string", "null"]}
_OBJECT: Final = {"type": ["object", "null"]}
_DURATION: Final = {"type": ["number", "null"], "minimum": 0}
_SCALAR: Final = {"type": ["string", "number", "boolean", "null"]}


def _schemas() -> dict[str, Any]:
    return {
        "EventType": {
            "type": "string",
            "pattern": "^[a-z0-9][a-z0-9._-]{0,63}$",
            "description": (
                "Request-response events (" + ", ".join(sorted(REQUEST_RESPONSE_TYPES)) + ") are "
                "kept on the events topic and then answered (200) with what the sender documents "
                "as neutral, or 422 where it documents none and none is configured."
            ),
            "examples": [END_OF_CALL_REPORT_TYPE, "status-update"],
        },
        "CallId": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_CALL_ID_LENGTH,
            "pattern": r"\S",
            "description": "Opaque; becomes the Kafka key and the storage primary key.",
        },
        "EpochMillis": {
            "type": "integer",
            "minimum": MIN_EVENT_TIME_MS,
            "exclusiveMaximum": MAX_EVENT_TIME_MS,
            "description": "Epoch milliseconds, 2000-01-01 .. 2100-01-01.",
        },
        "Timestamp": {
            "oneOf": [
                {
                    "type": "string",
                    "format": "date-time",
                    "description": "ISO-8601 with a zone (`Z` or `+hh:mm`), 2000 .. 2100.",
                },
                _ref("EpochMillis"),
            ]
        },
        "FlatPayload": {
            "title": "Flat",
            "description": (
                "The older documented shape. An end-of-call-report needs `callId`; without "
                "`eventTimestamp` it takes the receive time. Other notifications "
                "(status-update) need only `eventType` and may name the call `callSession`; "
                "tool-calls times itself with `eventTime`."
            ),
            "type": "object",
            "required": ["eventType"],
            "not": {"required": ["message"]},
            "properties": {
                "eventType": _ref("EventType"),
                "callId": _ref("CallId"),
                "callSession": _ref("CallId"),
                "eventTimestamp": _ref("EpochMillis"),
                "eventTime": _ref("EpochMillis"),
                "fromCaller": _STRING | {"description": "The caller's number: personal data."},
                "toAssistant": _STRING,
                "transcriptText": _STRING,
                "summaryText": _STRING,
                "recordings": _OBJECT | {"properties": {"linkStereo": _STRING}},
                "callLengthSeconds": _DURATION,
                "userMetadata": _OBJECT,
                "analysis": _OBJECT
                | {
                    "properties": {
                        "summary": _STRING,
                        "structuredData": _OBJECT,
                        "successEvaluation": _SCALAR,
                    }
                },
            },
            "if": {
                "properties": {"eventType": {"const": END_OF_CALL_REPORT_TYPE}},
                "required": ["eventType"],
            },
            "then": {"required": ["callId"]},
        },
        "NestedCamelPayload": _nested(snake=False),
        "NestedSnakePayload": _nested(snake=True),
        "Payload": {
            "oneOf": [
                _ref("FlatPayload"),
                _ref("NestedCamelPayload"),
                _ref("NestedSnakePayload"),
            ]
        },
        "Accepted": {
            "type": "object",
            "required": ["status", "eventType", "requestId", "topic"],
            "properties": {
                "status": {"const": "accepted"},
                "eventType": {"type": "string"},
                "callId": {"type": ["string", "null"]},
                "requestId": {"type": "string"},
                "topic": {"type": "string", "description": "The Kafka topic it went to."},
                "durable": {
                    "enum": ["kafka", "spool"],
                    "description": (
                        "spool: fsync'd on the ingress's disk; it reaches the topic once Kafka "
                        "is back."
                    ),
                },
            },
        },
        "Problem": {
            "description": "RFC 9457 problem details; `type` ends in a stable slug.",
            "type": "object",
            "required": ["type", "title", "status", "detail", "requestId"],
            "properties": {
                "type": {"type": "string", "pattern": "^urn:callstream:problem:[a-z-]+$"},
                "title": {"type": "string"},
                "status": {"type": "integer", "minimum": 400, "maximum": 599},
                "detail": {"type": "string"},
                "pointer": {
                    "type": "string",
                    "description": "RFC 6901 pointer to the offending field of the body.",
                },
                "requestId": {"type": "string"},
            },
        },
        "Health": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"const": "ok"}},
        },
        "Readiness": {
            "type": "object",
            "required": ["ready"],
            "properties": {
                "ready": {"type": "boolean"},
                "durable": {
                    "enum": ["kafka", "spool", None],
                    "description": "Where a report posted now would be made durable.",
                },
                "spool": {
                    "type": "object",
                    "properties": {
                        "records": {"type": "integer", "minimum": 0},
                        "bytes": {"type": "integer", "minimum": 0},
                        "oldestAgeSeconds": {"type": "number", "minimum": 0},
                        "writable": {
                            "type": "boolean",
                            "description": "False after a failed write (a full or read-only"
                            " disk) until one succeeds.",
                        },
                    },
                },
            },
        },
    }


def _nested(*, snake: bool) -> dict[str, Any]:
    def key(camel: str, snake_name: str) -> str:
        return snake_name if snake else camel

    markers = [{"required": [marker]} for marker in SNAKE_CASE_MARKERS]
    message: dict[str, Any] = {
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": _ref("EventType"),
            "timestamp": _ref("Timestamp"),
            "call": _OBJECT
            | {"properties": {"id": _ref("CallId"), "type": _STRING, "status": _STRING}},
            key("endedReason", "ended_reason"): _STRING,
            "customer": _OBJECT
            | {"properties": {"number": _STRING | {"description": "The caller: personal data."}}},
            key("phoneNumber", "phone_number"): _OBJECT
            | {"properties": {"number": _STRING, "name": _STRING}},
            key("durationSeconds", "duration_seconds"): _DURATION,
            "transcript": _STRING,
            "summary": _STRING,
            key("recordingUrl", "recording_url"): _STRING,
            "analysis": _OBJECT | {"description": "The user-defined structured data."},
        },
        "if": {
            "properties": {"type": {"const": END_OF_CALL_REPORT_TYPE}},
            "required": ["type"],
        },
        "then": {
            "required": ["call"],
            "properties": {"call": {"type": "object", "required": ["id"]}},
        },
    }
    if snake:
        message["anyOf"] = markers
        title = "NestedSnake"
        description = (
            "The current shape as one version of Flireo's docs spells it: at least one "
            f"snake_case key ({', '.join(SNAKE_CASE_MARKERS)}); a message with more of these than "
            f"of their camelCase twins ({', '.join(CAMEL_CASE_MARKERS)}) is read as snake_case."
        )
    else:
        message["not"] = {"anyOf": markers}
        title = "NestedCamel"
        description = (
            'The current shape in camelCase: `{"message": {"type", ...}}`. Vapi\'s nested shape '
            "is read through this one too: without Flireo's `durationSeconds`/`summary`, a "
            "message with `artifact`, `endedReason`, `startedAt`, `costs`, `call.orgId` or a "
            "Vapi-only type is Vapi's, whose `analysis` is a wrapper "
            "{summary, structuredData, successEvaluation}."
        )
    return {
        "title": title,
        "description": description,
        "type": "object",
        "required": ["message"],
        "properties": {"message": message},
    }


def _problem(description: str, *, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}
        | (headers or {}),
        "content": {PROBLEM_CONTENT_TYPE: {"schema": _ref("Problem")}},
    }


_RETRY_AFTER: Final = {
    "Retry-After": {
        "required": True,
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


_QUARANTINED: Final = {
    QUARANTINE_HEADER: {
        "required": False,
        "description": "Present when the refused request was kept in the quarantine "
        "(<topic>.rejected; README: the webhook): `kafka`, or `spool` while Kafka is away. "
        "Absent: not authenticated, or refused before its body was read.",
        "schema": {"type": "string", "enum": ["kafka", "spool"]},
    }
}


def _responses(settings: IngressSettings) -> dict[str, Any]:
    limit = settings.max_body_bytes
    return {
        "BadRequest": _problem(
            "Not acceptable JSON (`invalid-json`): invalid UTF-8, NaN/Infinity, an integer "
            f"beyond 64 bits, nesting deeper than {settings.max_json_depth}; or a gzip body "
            "that is not gzip (`invalid-gzip`).",
            headers=_QUARANTINED,
        ),
        "Unauthorized": _problem(
            "The signature or token is missing or wrong, or the signature's timestamp is more "
            f"than {settings.signature_tolerance_seconds} s from the server's clock."
        ),
        "NotFound": _problem("No such path (`not-found`)."),
        "RequestTimeout": _problem(
            f"The body did not arrive within {settings.body_timeout_seconds:g} s (`body-timeout`)."
        ),
        "PayloadTooLarge": _problem(
            f"The body, or the body after gunzip, is over {limit} bytes (`body-too-large`).",
            headers=_QUARANTINED,
        ),
        "UnsupportedMediaType": _problem(
            "A Content-Encoding other than gzip (`unsupported-encoding`).",
            headers=_QUARANTINED,
        ),
        "UnprocessableContent": _problem(
            "The report breaks the contract (`invalid-report`; `pointer` names the field), or "
            "it is a request-response event without a neutral answer and none is configured "
            "(`unsupported-event`: flat or Vapi assistant-request, transfer-destination-request;"
            " the event is still kept on the events topic).",
            headers=_QUARANTINED,
        ),
        "TooManyRequests": _problem(
            "This source sent more than its rate allows (`rate-limited`); only when "
            "CALLSTREAM_RATE_LIMIT_PER_SECOND is set.",
            headers=_RETRY_AFTER,
        ),
        "InternalError": _problem(
            "A bug (`internal-error`): nothing was kept; the detail is in the ingress log."
        ),
        "ServiceUnavailable": _problem(
            "The report, or the quarantine copy of a request refused with a 4xx, could not be "
            "made durable in time (`unavailable`), the connection is past the "
            f"{settings.max_connections} served at once (`over-capacity`, answered before the "
            "body is read, then the connection closes), or the ingress already holds "
            f"{settings.max_inflight_body_bytes} bytes of request bodies (`busy`): nothing was "
            "kept, retry after Retry-After seconds.",
            headers=_RETRY_AFTER,
        ),
    }


def _webhook(settings: IngressSettings) -> dict[str, Any]:
    return {
        "post": {
            "operationId": "receiveFlireoWebhook",
            "summary": "Receive one Flireo webhook event",
            "description": (
                "An end-of-call-report goes to the reports topic, other notifications to the "
                "events topic; 202 only once the record is durable. The signature covers the "
                "bytes as sent (before gunzip). Unknown fields are kept. An ingress started "
                "without CALLSTREAM_WEBHOOK_SECRET and CALLSTREAM_SHARED_TOKEN accepts "
                "unauthenticated requests and says so in its log."
            ),
            "security": [
                {"flireoSignature": [], "flireoTimestamp": []},
                {"sharedToken": []},
            ],
            "parameters": [
                {
                    "name": "Content-Encoding",
                    "in": "header",
                    "required": False,
                    "schema": {"enum": ["identity", "gzip", "x-gzip"]},
                    "description": f"gzip bodies are inflated to at most {settings.max_body_bytes}"
                    " bytes.",
                },
                {"$ref": "#/components/parameters/X-Request-Id"},
            ],
            "requestBody": {
                "required": True,
                "description": f"At most {settings.max_body_bytes} bytes, as sent and inflated.",
                "content": {
                    JSON: {
                        "schema": _ref("Payload"),
                        "examples": _examples(),
                    }
                },
            },
            "responses": {
                "200": {
                    "description": (
                        "The answer to a request-response event, given once the event is durable "
                        "on the events topic: the configured or documented neutral reply "
                        "(assistant-request: e.g. {}; tool-calls: a 'not available' result or "
                        "error per call)."
                    ),
                    "headers": {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}},
                    "content": {JSON: {"schema": {"type": "object"}}},
                },
                "202": {
                    "description": "Durable: Kafka (acks=all) or the ingress's local spool.",
                    "headers": {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}},
                    "content": {JSON: {"schema": _ref("Accepted")}},
                },
                "400": _ref("BadRequest", _RESPONSES),
                "401": _ref("Unauthorized", _RESPONSES),
                "408": _ref("RequestTimeout", _RESPONSES),
                "413": _ref("PayloadTooLarge", _RESPONSES),
                "415": _ref("UnsupportedMediaType", _RESPONSES),
                "422": _ref("UnprocessableContent", _RESPONSES),
                "429": _ref("TooManyRequests", _RESPONSES),
                "500": _ref("InternalError", _RESPONSES),
                "503": _ref("ServiceUnavailable", _RESPONSES),
            },
        }
    }


def _examples() -> dict[str, Any]:
    # Fictitious numbers (the +31 6 0000 range is never issued) and made-up ids.
    return {
        "flat": {
            "value": {
                "eventType": END_OF_CALL_REPORT_TYPE,
                "callId": "cc1abf4a-d005-44a8-825f-702334e8d4c8",
                "eventTimestamp": 1756294820944,
                "fromCaller": "+31600000001",
                "toAssistant": "+31850000002",
                "callLengthSeconds": 132.5,
                "analysis": {"structuredData": {"sentiment": 9}, "successEvaluation": "true"},
            }
        },
        "nestedCamel": {
            "value": {
                "message": {
                    "type": END_OF_CALL_REPORT_TYPE,
                    "timestamp": "2025-12-13T12:05:30Z",
                    "call": {"id": "5c4d030f-8f7b-4e0c-9a51-2f3b1f6e9d11"},
                    "customer": {"number": "+31600000003"},
                    "durationSeconds": 84,
                }
            }
        },
        "nestedSnake": {
            "value": {
                "message": {
                    "type": END_OF_CALL_REPORT_TYPE,
                    "timestamp": "2025-12-13T12:07:02Z",
                    "call": {"id": "7e1f2a3b-0c4d-4e5f-8a9b-1c2d3e4f5a6b"},
                    "duration_seconds": 12.75,
                }
            }
        },
        "statusUpdate": {
            "value": {
                "eventType": "status-update",
                "callSession": "cc1abf4a-d005-44a8-825f-702334e8d4c8",
                "eventTimestamp": 1756294700000,
                "status": "in-progress",
            }
        },
    }


def _get(operation_id: str, summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"operationId": operation_id, "summary": summary, "responses": responses}}


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def document(settings: IngressSettings) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "callstream ingress",
            "version": __version__,
            "description": (
                "Receives Flireo webhooks, checks and normalises them, and makes them durable "
                "on Kafka as Avro. Every refusal is application/problem+json."
            ),
        },
        "paths": {
            WEBHOOK_PATH: _webhook(settings),
            "/healthz": _get(
                "healthz",
                "The process is up",
                {"200": _json_response("Up.", _ref("Health"))},
            ),
            "/readyz": _get(
                "readyz",
                "A report posted now can be made durable",
                {
                    "200": _json_response("Ready.", _ref("Readiness")),
                    "503": _json_response("Not ready: a post would be refused.", _ref("Readiness")),
                },
            ),
            "/metrics": _get(
                "metrics",
                "Prometheus metrics",
                {
                    "200": {
                        "description": "The exposition format the Accept header asks for.",
                        "content": {
                            "text/plain": {"schema": {"type": "string"}},
                            "application/openmetrics-text": {"schema": {"type": "string"}},
                        },
                    }
                },
            ),
            PATH: _get(
                "openapi",
                "This description",
                {"200": _json_response("OpenAPI 3.1.", {"type": "object"})},
            ),
        },
        "components": {
            "schemas": _schemas(),
            "responses": _responses(settings),
            "parameters": {
                "X-Request-Id": {
                    "name": "X-Request-Id",
                    "in": "header",
                    "required": False,
                    "description": "Echoed back and carried to Kafka; otherwise one is made up.",
                    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
                }
            },
            "headers": {
                "X-Request-Id": {
                    "description": "The request's id, as in the logs and the Kafka header.",
                    "schema": {"type": "string"},
                }
            },
            "securitySchemes": {
                "flireoSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": SIGNATURE_HEADER,
                    "description": (
                        "hex HMAC-SHA256(secret, timestamp + '.' + raw body), optionally "
                        f"prefixed `{SIGNATURE_PREFIX}`; any of the comma-separated "
                        "CALLSTREAM_WEBHOOK_SECRET values."
                    ),
                },
                "flireoTimestamp": {
                    "type": "apiKey",
                    "in": "header",
                    "name": TIMESTAMP_HEADER,
                    "description": (
                        "Unix time of signing, in seconds or milliseconds; within "
                        f"{settings.signature_tolerance_seconds} s of the server's clock."
                    ),
                },
                "sharedToken": {
                    "type": "apiKey",
                    "in": "header",
                    "name": TOKEN_HEADER,
                    "description": "One of CALLSTREAM_SHARED_TOKEN, for senders that cannot sign.",
                },
            },
        },
    }


def handler(settings: IngressSettings) -> Callable[[web.Request], Awaitable[web.Response]]:
    """GET /openapi.json: rendered once, at start-up."""
    body = orjson.dumps(document(settings), option=orjson.OPT_INDENT_2)

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=JSON)

    return openapi_json


if __name__ == "__main__":
    defaults = IngressSettings(kafka=KafkaSettings(bootstrap_servers="localhost:9092"))
    sys.stdout.write(orjson.dumps(document(defaults), option=orjson.OPT_INDENT_2).decode() + "\n")
