"""`FlireoEvent`: a decoded record of the events topic as consumers see it, and the status
update a `status-update` event tells.

The record keeps the whole body (`body_json`), so the facts of a status update are read
from the body here rather than from typed fields: records written with any version of the
schema, already on the topic, give the same timeline when they are read again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson

from schemas.converters import MISSING, peek
from schemas.errors import InvalidReport
from schemas.fieldmaps import STATUS_UPDATE_PATHS, Path, detect_format
from schemas.report import record_time

STATUS_UPDATE_TYPE = "status-update"


@dataclass(frozen=True, slots=True)
class FlireoEvent:
    event_type: str
    call_id: str | None
    event_time: datetime | None  # None: the sender gave none
    body_json: str
    source_format: str
    received_at: datetime
    request_id: str

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> FlireoEvent:
        source = record["source"]
        sent = record.get("event_time")
        return cls(
            event_type=record["event_type"],
            call_id=record.get("call_id"),
            event_time=None if sent is None else record_time(sent),
            body_json=record["body_json"],
            source_format=source["format"],
            received_at=record_time(source["received_at"]),
            request_id=source["request_id"],
        )


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """One step of a call's life: what a `status-update` event said, and when."""

    call_id: str
    event_time: datetime
    # "sent": the sender's time; "received": it gave none, so the receive time.
    event_time_source: Literal["sent", "received"]
    status: str | None
    ended_reason: str | None
    error: str | None
    # The caller's number, as the report's from_number: erasure by phone finds it by this.
    from_number: str | None


def status_update(event: FlireoEvent) -> StatusUpdate | None:
    """The status update `event` tells; None for other event types and for an update that
    names no call (nothing to attach it to)."""
    if event.event_type != STATUS_UPDATE_TYPE or event.call_id is None:
        return None
    body = orjson.loads(event.body_json)
    paths = _paths(event.source_format, body)

    def text(name: str) -> str | None:
        for path in paths[name]:
            value = peek(body, path)
            if value is not MISSING and value is not None:
                # A string as sent; anything else as its JSON text, so nothing is guessed at.
                return value if isinstance(value, str) else orjson.dumps(value).decode()
        return None

    return StatusUpdate(
        call_id=event.call_id,
        event_time=event.received_at if event.event_time is None else event.event_time,
        event_time_source="received" if event.event_time is None else "sent",
        status=text("status"),
        ended_reason=text("ended_reason"),
        error=text("error"),
        from_number=text("from_number"),
    )


def _paths(recorded: str, body: Any) -> dict[str, tuple[Path, ...]]:
    if recorded in STATUS_UPDATE_PATHS:
        return STATUS_UPDATE_PATHS[recorded]
    # UNKNOWN: a record written before the format was recorded. The body tells.
    try:
        return STATUS_UPDATE_PATHS[detect_format(body)]
    except InvalidReport:
        return STATUS_UPDATE_PATHS["VAPI"]
