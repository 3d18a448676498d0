"""The quarantine's record: an authenticated request the ingress refused, kept so it can be
listed, reprocessed and erased (schemas/avro/rejected_request.v*.avsc).

On `<topic>.rejected` each record is keyed by the request id and carries the usual
RecordHeaders (event type `rejected-request`, source format UNKNOWN: a refused body may be
no known format at all). The latest record per request id is that request's state:
QUARANTINED when refused, REPROCESSED once `callstream rejected reprocess` published it
(the same record, with where it went), and a tombstone (no value) once erased.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any, Final, Literal

from schemas.codec import Encoder
from schemas.headers import RecordHeaders

REJECTED_EVENT_TYPE: Final = "rejected-request"
UNKNOWN_FORMAT: Final = "UNKNOWN"

State = Literal["QUARANTINED", "REPROCESSED"]
# The fields the record names otherwise: times, in epoch milliseconds here (see _millis).
_MILLIS: Final = {"received_at_ms": "received_at", "reprocessed_at_ms": "reprocessed_at"}


@dataclass(frozen=True, slots=True)
class RejectedRequest:
    request_id: str
    received_at_ms: int
    status: int
    problem: str  # the problem slug
    title: str
    detail: str
    pointer: str | None
    body: bytes  # as sent (gzip stays gzip); the first bytes only when body_truncated
    body_size: int
    body_truncated: bool
    headers: Mapping[str, str]
    authenticated_by: str
    state: State = "QUARANTINED"
    reprocessed_at_ms: int | None = None
    reprocessed_to: str | None = None
    call_id: str | None = None

    def to_record(self) -> dict[str, Any]:
        record = {_MILLIS.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}
        return record | {"headers": dict(self.headers)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RejectedRequest:
        values = {f.name: record[_MILLIS.get(f.name, f.name)] for f in fields(cls)}
        for name in _MILLIS:
            values[name] = _millis(values[name])
        return cls(**values | {"headers": dict(values["headers"])})

    def reprocessed(self, at_ms: int, topic: str, call_id: str | None) -> RejectedRequest:
        """The REPROCESSED state: the whole entry stays, so `show` still tells its story."""
        return replace(
            self,
            state="REPROCESSED",
            reprocessed_at_ms=at_ms,
            reprocessed_to=topic,
            call_id=call_id,
        )

    def record_headers(self, encoder: Encoder) -> RecordHeaders:
        return RecordHeaders(
            REJECTED_EVENT_TYPE,
            encoder.schema_id,
            encoder.wire_format,
            UNKNOWN_FORMAT,
            self.request_id,
        )

    def content_encoding(self) -> str:
        return self.headers.get("content-encoding", "identity").strip().lower()

    def payload_bytes(self, limit: int) -> bytes | None:
        """The body as JSON bytes (gzip undone, never past `limit`); None when it cannot be
        had: cut short, an unknown encoding, or corrupt or oversized gzip."""
        if self.body_truncated:
            return None
        encoding = self.content_encoding()
        if encoding == "identity":
            return self.body
        if encoding not in {"gzip", "x-gzip"}:
            return None
        out = bytearray()
        rest = self.body
        while rest:
            inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            try:
                out += inflater.decompress(rest, limit + 1 - len(out))
            except zlib.error:
                return None
            if len(out) > limit or not inflater.eof:
                return None
            rest = inflater.unused_data
        return bytes(out)

    def to_json(self) -> dict[str, Any]:
        """What `callstream rejected list --json` prints: everything but the body itself."""
        return {
            "requestId": self.request_id,
            "state": self.state,
            "receivedAt": iso(self.received_at_ms),
            "status": self.status,
            "problem": self.problem,
            "title": self.title,
            "detail": self.detail,
            "pointer": self.pointer,
            "bodySize": self.body_size,
            "bodyKept": len(self.body),
            "bodyTruncated": self.body_truncated,
            "contentEncoding": self.content_encoding(),
            "authenticatedBy": self.authenticated_by,
            "reprocessedAt": None
            if self.reprocessed_at_ms is None
            else iso(self.reprocessed_at_ms),
            "reprocessedTo": self.reprocessed_to,
            "callId": self.call_id,
        }


def iso(millis: int) -> str:
    return datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="milliseconds")


def _millis(value: Any) -> Any:
    # fastavro hands timestamp-millis back as an aware datetime.
    if isinstance(value, datetime):
        return round(value.timestamp() * 1000)
    return value
