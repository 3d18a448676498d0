"""One row of `call_reports` per call: its columns are `CallReport`'s fields, so a field
added to the report cannot be forgotten by the upsert or by the reading back. The typed
columns are a queryable copy; `record`, the report as it sat on the topic, is the truth that
replays re-publish."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Final, Literal, get_type_hints

from consumers.contract import Delivery
from schemas.report import CallReport

# How a column is kept: each dialect maps a kind onto its own types and conversions.
Kind = Literal["text", "time", "real", "json", "bytes", "int"]


@dataclasses.dataclass(frozen=True, slots=True)
class StoredReport(CallReport):
    """One row of `call_reports`, read back: the report, and where and when it was stored."""

    record: bytes
    kafka_partition: int
    kafka_offset: int
    stored_at: datetime


# Objects, and success_evaluation's union, are JSON: it keeps booleans, numbers and
# strings apart. Offsets outgrow 32 bits, so every integer column is written as 64-bit.
_KINDS: Final[dict[object, Kind]] = {
    datetime: "time",
    datetime | None: "time",
    str: "text",
    str | None: "text",
    int | float | None: "real",
    bytes: "bytes",
    int: "int",
}
_HINTS: Final = get_type_hints(StoredReport)
# Every column in row order. `stored_at` comes last: it is bound once per batch.
COLUMNS: Final[tuple[tuple[str, Kind], ...]] = tuple(
    (f.name, _KINDS.get(_HINTS[f.name], "json")) for f in dataclasses.fields(StoredReport)
)
NAMES: Final = tuple(name for name, _ in COLUMNS)
_report_values: Final = operator.attrgetter(*(f.name for f in dataclasses.fields(CallReport)))


def row_values(delivery: Delivery) -> list[Any]:
    """The row for one delivery as Python values, in COLUMNS order without `stored_at`."""
    return [*_report_values(delivery.report), delivery.value, delivery.partition, delivery.offset]


def _version(report: CallReport) -> tuple[datetime, datetime]:
    """Which of two reports of one call is newer: later event, then later receipt."""
    return report.event_time, report.received_at


def newest_per_call(batch: Iterable[Delivery], key: Callable[[str], str]) -> list[Delivery]:
    """The newest delivery of each call in `batch`, sorted by call id as `key` stores it.

    PostgreSQL's ON CONFLICT refuses to touch one row twice in a statement, so versions
    are settled here first; on a tie the first seen wins, as the stored row does. The
    sort gives every instance the same lock order, which keeps concurrent upserts of
    overlapping batches from deadlocking.
    """
    newest: dict[str, Delivery] = {}
    for delivery in batch:
        call = key(delivery.report.call_id)
        held = newest.get(call)
        if held is None or _version(delivery.report) > _version(held.report):
            newest[call] = delivery
    return [newest[call] for call in sorted(newest)]
