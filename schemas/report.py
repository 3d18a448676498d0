"""`CallReport`: the decoded canonical record as consumers see it (JSON fields parsed)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson

from schemas.converters import EPOCH
from schemas.normalise import denormalise
from schemas.turns import Turn

JsonObject = dict[str, Any]

# The report's fields the record holds as JSON text, in `<name>_json`.
JSON_FIELDS: Final = ("structured_data", "user_metadata", "costs", "transcript_turns", "extra")


def record_time(value: datetime | int) -> datetime:
    """A time of the record as the report holds it: aware, UTC when the writer gave none."""
    if isinstance(value, int):
        return EPOCH + timedelta(milliseconds=value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _parse(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


def _optional_time(value: datetime | int | None) -> datetime | None:
    return None if value is None else record_time(value)


@dataclass(frozen=True, slots=True)
class CallReport:
    call_id: str
    event_type: str
    event_time: datetime
    call_type: str | None
    call_status: str | None
    ended_reason: str | None
    from_number: str | None
    to_number: str | None
    assistant_name: str | None
    duration_seconds: int | float | None
    transcript: str | None
    summary: str | None
    recording_url: str | None
    analysis_summary: str | None
    success_evaluation: bool | int | float | str | None
    structured_data: JsonObject | None
    user_metadata: JsonObject | None
    # since v3 (None in records written before it)
    started_at: datetime | None
    ended_at: datetime | None
    cost: int | float | None
    costs: list[JsonObject] | None
    agent_id: str | None
    agent_name: str | None
    transcript_turns: list[Turn] | None
    extra: JsonObject | None
    source_format: str
    received_at: datetime
    request_id: str
    # "sent": event_time is the sender's; "received": the sender gave none, so it is the
    # receive time (records before v3 always had a sender's time).
    event_time_source: str
    derived_fields: list[str] | None

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> CallReport:
        source = record["source"]
        values: dict[str, Any] = {name: record.get(name) for name in _NAMES}
        values.update(
            call_id=record["call_id"],
            event_type=record["event_type"],
            event_time=record_time(record["event_time"]),
            started_at=_optional_time(record.get("started_at")),
            ended_at=_optional_time(record.get("ended_at")),
            source_format=source["format"],
            received_at=record_time(source["received_at"]),
            request_id=source["request_id"],
            event_time_source=source.get("event_time_source") or "sent",
            derived_fields=source.get("derived_fields"),
        )
        for name in JSON_FIELDS:
            values[name] = _parse(record.get(f"{name}_json"))
        return cls(**values)

    @staticmethod
    def check_record(record: dict[str, Any]) -> None:
        """Raise what `from_record` would raise for `record`, without building the report
        (KeyError, TypeError or ValueError): the runner checks every record this way and
        leaves the report to be built only if a consumer reads it."""
        record["call_id"], record["event_type"]  # required: KeyError if absent
        record_time(record["event_time"])
        source = record["source"]
        source["format"], source["request_id"]
        record_time(source["received_at"])
        for name in JSON_FIELDS:
            _parse(record.get(f"{name}_json"))

    def to_record(self) -> dict[str, Any]:
        """The Avro-shaped record again (for re-publishing from storage)."""
        record = asdict(self)
        for name in JSON_FIELDS:
            value = record.pop(name)
            record[f"{name}_json"] = None if value is None else orjson.dumps(value).decode()
        record["source"] = {
            "format": record.pop("source_format"),
            "received_at": record.pop("received_at"),
            "request_id": record.pop("request_id"),
            "event_time_source": record.pop("event_time_source"),
            "derived_fields": record.pop("derived_fields"),
        }
        return record

    def source_payload(self) -> JsonObject:
        """The webhook body exactly as Flireo sent it."""
        return denormalise(self.to_record())

    def to_json(self) -> JsonObject:
        """A JSON-ready dict (times as ISO-8601 UTC)."""
        out = asdict(self)
        for name in ("event_time", "received_at", "started_at", "ended_at"):
            moment = getattr(self, name)
            out[name] = None if moment is None else moment.isoformat().replace("+00:00", "Z")
        return out


# Read once: from_record runs for every report a consumer reads.
_NAMES: Final = tuple(f.name for f in fields(CallReport))
