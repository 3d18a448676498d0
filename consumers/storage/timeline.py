"""`call_events`: each call's status updates, read from the events topic, so that a call's
life can be queried next to its report. One row per status update as delivered, keyed by
(call_id, request_id); other event types and updates that name no call are not kept (the
events topic still has them). docs/storage.md shows the table and how to query it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, get_type_hints

from consumers.contract import EventDelivery
from consumers.errors import PermanentError
from consumers.storage.dialects import Dialect
from consumers.storage.rows import KINDS
from consumers.storage.statements import Statement
from schemas.events import StatusUpdate, status_update


@dataclass(frozen=True, slots=True)
class StoredStatus:
    """One row of `call_events`, read back."""

    call_id: str
    request_id: str
    event_type: str
    event_time: datetime
    event_time_source: str
    received_at: datetime
    status: str | None
    ended_reason: str | None
    error: str | None
    from_number: str | None
    source_format: str
    kafka_partition: int
    kafka_offset: int
    stored_at: datetime


_HINTS: Final = get_type_hints(StoredStatus)
# Every column in row order, StoredStatus's fields; stored_at, last, is bound once per batch.
COLUMNS: Final = tuple((f.name, KINDS[_HINTS[f.name]]) for f in dataclasses.fields(StoredStatus))
NAMES: Final = tuple(name for name, _ in COLUMNS)
_TIMES: Final = tuple(name for name, kind in COLUMNS if kind == "time")
# A status update already stored (a redelivery, a replay) changes nothing.
_NEW_ONLY: Final = " ON CONFLICT (call_id, request_id) DO NOTHING"
QUERY: Final = (
    f"SELECT {', '.join(NAMES)} FROM call_events WHERE call_id = ?"  # noqa: S608
    " ORDER BY event_time, received_at"
)


def status_updates(batch: Iterable[EventDelivery]) -> list[tuple[EventDelivery, StatusUpdate]]:
    """The deliveries in `batch` that are status updates of a call, with what each says."""
    found = []
    for delivery in batch:
        try:
            update = status_update(delivery.event)
        except ValueError as exc:
            # The body is not JSON: nothing a retry could change.
            raise PermanentError(f"event body cannot be read: {exc}") from exc
        if update is not None:
            found.append((delivery, update))
    return found


def rows(
    dialect: Dialect, updates: Sequence[tuple[EventDelivery, StatusUpdate]]
) -> list[tuple[Any, ...]]:
    """The rows of `updates` in COLUMNS order without stored_at."""
    text, time = dialect.text, dialect.time

    def optional(value: str | None) -> str | None:
        return None if value is None else text(value)

    return [
        (
            text(update.call_id),
            text(delivery.event.request_id),
            text(delivery.event.event_type),
            time(update.event_time),
            update.event_time_source,
            time(delivery.event.received_at),
            optional(update.status),
            optional(update.ended_reason),
            optional(update.error),
            optional(update.from_number),
            delivery.event.source_format,
            delivery.partition,
            delivery.offset,
        )
        for delivery, update in updates
    ]


def insert(dialect: Dialect, batch: Sequence[tuple[Any, ...]], stored_at: datetime) -> Statement:
    return dialect.bulk(dialect.insert("call_events", COLUMNS, _NEW_ONLY), batch, stored_at)


def stored(dialect: Dialect, row: Sequence[Any]) -> StoredStatus:
    values = dict(zip(NAMES, row, strict=True))
    for name in _TIMES:
        values[name] = dialect.read_time(values[name])
    return StoredStatus(**values)
