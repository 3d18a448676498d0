"""One row of `call_reports` per call: its columns are `CallReport`'s fields, so a field
added to the report cannot be forgotten by the upsert or by the reading back. The typed
columns are a queryable copy; `record`, the report as it sat on the topic, is the truth that
replays re-publish.

`success_evaluation` is the one column kept differently from its field: as plain text
(`true`, `8`, `Good`), because a query compares it with a literal, and JSON text (`"true"`
with its quotes) matched none. Its typed twin `success` says what a pass/fail rubric
answered (docs/payload-formats.md, "Stored columns")."""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Final, Literal, get_type_hints

import orjson

from consumers.contract import DecodedDelivery, Delivery
from schemas.report import JSON_FIELDS, CallReport, record_time

# How a column is kept: each dialect maps a kind onto its own types and conversions.
Kind = Literal["text", "time", "real", "json", "bytes", "int", "bool"]


@dataclasses.dataclass(frozen=True, slots=True)
class StoredReport(CallReport):
    """One row of `call_reports`, read back: the report, and where and when it was stored."""

    record: bytes
    kafka_partition: int
    kafka_offset: int
    # True or false when success_evaluation is a boolean or the word true/false; else None.
    success: bool | None
    stored_at: datetime


# Objects are JSON. Offsets outgrow 32 bits, so every integer column is written as 64-bit.
KINDS: Final[dict[object, Kind]] = {
    datetime: "time",
    datetime | None: "time",
    str: "text",
    str | None: "text",
    int | float | None: "real",
    bytes: "bytes",
    int: "int",
    bool | None: "bool",
}
# Columns kept otherwise than their field's type says (see the module's docstring).
_AS_TEXT: Final = frozenset({"success_evaluation"})
_HINTS: Final = get_type_hints(StoredReport)
# Every column in row order. `stored_at` comes last: it is bound once per batch.
COLUMNS: Final[tuple[tuple[str, Kind], ...]] = tuple(
    (f.name, "text" if f.name in _AS_TEXT else KINDS.get(_HINTS[f.name], "json"))
    for f in dataclasses.fields(StoredReport)
)
NAMES: Final = tuple(name for name, _ in COLUMNS)
_report_values: Final = operator.attrgetter(*(f.name for f in dataclasses.fields(CallReport)))
_EVALUATION: Final = NAMES.index("success_evaluation")
# What the migration to plain text trims too (SQL's trim knows no Unicode spaces).
_ASCII_SPACE: Final = " \t\n\r\x0b\x0c"


def evaluation_text(evaluation: bool | int | float | str) -> str:
    """success_evaluation as its column holds it: a string as sent, anything else as JSON
    spells it (`true`, `7`, `0.5`), which is what the migration from JSON text gives too."""
    if isinstance(evaluation, str):
        return evaluation
    if isinstance(evaluation, float) and not math.isfinite(evaluation):
        # Only Avro can carry these (JSON has no spelling); Python's is as good as any.
        return repr(evaluation)
    return orjson.dumps(evaluation).decode()


def success_flag(evaluation: bool | int | float | str | None) -> bool | None:
    """The `success` column: a boolean as it is, the word true or false in any ASCII case
    and without surrounding spaces as that boolean, anything else (a score, a grade,
    nothing) None. Numbers are not guessed at: whether 7 passes is the rubric's business."""
    if isinstance(evaluation, bool):
        return evaluation
    if isinstance(evaluation, str):
        word = evaluation.strip(_ASCII_SPACE)
        if word.isascii() and word.lower() in ("true", "false"):
            return word.lower() == "true"
    return None


def row_values(delivery: Delivery) -> list[Any]:
    """The row for one delivery as Python values, in COLUMNS order without `stored_at`."""
    return _row(delivery, [*_report_values(delivery.report)])


def _row(delivery: Delivery, values: list[Any]) -> list[Any]:
    """The report's `values` with success_evaluation as its column holds it, then the rest."""
    evaluation = values[_EVALUATION]
    if evaluation is not None:
        values[_EVALUATION] = evaluation_text(evaluation)
    return [*values, delivery.value, delivery.partition, delivery.offset, success_flag(evaluation)]


# -- the same row, straight from the Avro record ---------------------------------------------
# The runner hands storage the decoded record (consumers.contract.DecodedDelivery): its
# columns are taken from it as they are, JSON fields as the JSON text the record carries,
# without building the report and serialising its parsed JSON back again. Which record
# field feeds each column is derived from CallReport's fields like COLUMNS, so a field
# added to the report cannot be forgotten here either.
_REPORT_FIELDS: Final = tuple(f.name for f in dataclasses.fields(CallReport))
# Fields of the record's `source` (Provenance) record, by the report field they feed.
_SOURCE: Final = {
    "source_format": "format",
    "received_at": "received_at",
    "request_id": "request_id",
    "event_time_source": "event_time_source",
    "derived_fields": "derived_fields",
}
_TIMES: Final = frozenset(n for n in _REPORT_FIELDS if KINDS.get(_HINTS[n]) == "time")
#: Columns whose value the record holds as JSON text (a dialect passes it on as it is).
JSON_TEXT: Final = frozenset(JSON_FIELDS)
_TOP: Final = tuple(n for n in _REPORT_FIELDS if n not in _SOURCE)
if any(n not in _SOURCE for n in _REPORT_FIELDS[len(_TOP) :]):
    # record_row_values puts the source's fields after the others.
    raise TypeError("CallReport's provenance fields (_SOURCE) must come last")
_record_values: Final = operator.itemgetter(*(f"{n}_json" if n in JSON_TEXT else n for n in _TOP))
_source_values: Final = operator.itemgetter(*(_SOURCE[n] for n in _REPORT_FIELDS[len(_TOP) :]))
_TIME_POSITIONS: Final = tuple(_REPORT_FIELDS.index(n) for n in sorted(_TIMES))
_EVENT_TIME_SOURCE: Final = _REPORT_FIELDS.index("event_time_source")


def record_row_values(delivery: Delivery, record: dict[str, Any]) -> list[Any]:
    """As `row_values`, from the delivery's `record` (record_of): JSON columns hold the
    record's JSON text (str), where `row_values` gives the parsed value."""
    values = [*_record_values(record), *_source_values(record["source"])]
    for i in _TIME_POSITIONS:
        if values[i] is not None:
            values[i] = record_time(values[i])
    # Records written before v3 have no event_time_source: their time was the sender's.
    values[_EVENT_TIME_SOURCE] = values[_EVENT_TIME_SOURCE] or "sent"
    return _row(delivery, values)


def record_of(delivery: Delivery) -> dict[str, Any] | None:
    """The record storage builds `delivery`'s row from, if any (see record_row_values)."""
    return delivery.record if isinstance(delivery, DecodedDelivery) else None


def version(delivery: Delivery) -> tuple[str, datetime, datetime]:
    """The call and its version: of two reports of one call the later event is newer, then
    the later receipt."""
    record = record_of(delivery)
    if record is not None:
        received_at = record_time(record["source"]["received_at"])
        return record["call_id"], record_time(record["event_time"]), received_at
    report = delivery.report
    return report.call_id, report.event_time, report.received_at


def caller(delivery: Delivery) -> tuple[str, str | None]:
    """The call id and the caller's number, from the record when there is one."""
    record = record_of(delivery)
    if record is not None:
        return record["call_id"], record["from_number"]
    return delivery.report.call_id, delivery.report.from_number


def newest_per_call(batch: Iterable[Delivery], key: Callable[[str], str]) -> list[Delivery]:
    """The newest delivery of each call in `batch`, sorted by call id as `key` stores it.

    PostgreSQL's ON CONFLICT refuses to touch one row twice in a statement, so versions
    are settled here first; on a tie the first seen wins, as the stored row does. The
    sort gives every instance the same lock order, which keeps concurrent upserts of
    overlapping batches from deadlocking.
    """
    newest: dict[str, tuple[tuple[datetime, datetime], Delivery]] = {}
    for delivery in batch:
        call_id, event_time, received_at = version(delivery)
        call = key(call_id)
        held = newest.get(call)
        if held is None or (event_time, received_at) > held[0]:
            newest[call] = ((event_time, received_at), delivery)
    return [newest[call][1] for call in sorted(newest)]
