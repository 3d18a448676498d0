"""What `callstream replay --consumer` would do, worked out before anything changes: per
partition, the group's committed offset, where the range starts and ends, and how many records
lie between; and the plan rendered for the operator (and for --dry-run)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from callstream.clihelp import table
from callstream.consumerstatus import KafkaInspector
from callstream.erase import parse_age

# kafka-consumer-groups --by-duration's own spelling, ISO-8601 durations: -P7D, -PT2H30M.
_ISO_DURATION = re.compile(r"^-P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$")


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """ISO-8601 (`2025-08-20`, `2025-08-20T09:30`, `...Z`, `...+02:00`), UTC unless a zone
    is given; or a time back from now, as kafka-consumer-groups --by-duration counts back:
    `-7d`, `-2h`, `-30m`, `-90s`, `-2w`, or in its own spelling `-P7D`, `-PT2H30M`."""
    text = text.strip()
    if text.startswith("-"):
        return (now or datetime.now(UTC)) - _back(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"not an ISO-8601 time: {text!r} (or one back from now, such as -2h)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _back(text: str) -> timedelta:
    iso = _ISO_DURATION.match(text.upper())
    if iso is not None and any(iso.groups()):
        days, hours, minutes, seconds = (int(part or 0) for part in iso.groups())
        return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    try:
        return parse_age(text[1:])
    except ValueError:
        raise ValueError(
            f"not a time back from now such as -7d, -2h, -30m or -PT2H: {text!r}"
        ) from None


@dataclass(frozen=True, slots=True)
class PartitionPlan:
    partition: int
    beginning: int  # log start offset
    end: int  # log end offset when planned
    start: int  # first record at or after --from; `end` if there is none
    stop: int  # first record at or after --to; `end` without --to or if there is none
    committed: int | None  # the group's committed offset before the replay
    # No partition's commit is past its log start: the group has handled nothing that is
    # still retained (a new consumer, expired offsets, or a bounded replay's restore).
    fresh_group: bool

    @property
    def count(self) -> int:
        return max(self.stop - self.start, 0)

    @property
    def rewind_to(self) -> int | None:
        """Where a replay without --to moves the group's offset; None: left alone.

        A group that has consumed moves only backwards: moving it forward to --from would
        skip records it has not handled yet, and it reaches the range by itself. A fresh
        group would start at the log start; it starts at --from instead, which is how a new
        consumer gets "last week" rather than everything retained.
        """
        moved_back = self.committed is not None and self.committed > self.start
        return self.start if self.fresh_group or moved_back else None


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    consumer: str
    group_id: str
    topic: str
    since: datetime
    until: datetime | None
    partitions: tuple[PartitionPlan, ...]

    @property
    def total(self) -> int:
        return sum(p.count for p in self.partitions)

    @property
    def numbers(self) -> list[int]:
        return [p.partition for p in self.partitions]

    def done(self, committed: Mapping[int, int]) -> int:
        """Records of the range the group's commits have passed."""
        return sum(
            min(max(committed.get(p.partition, p.start) - p.start, 0), p.count)
            for p in self.partitions
        )

    def finished(self, committed: Mapping[int, int]) -> bool:
        return all(
            p.count == 0 or committed.get(p.partition, p.start) >= p.stop for p in self.partitions
        )


async def plan_replay(
    inspector: KafkaInspector,
    consumer: str,
    group_id: str,
    topic: str,
    since: datetime,
    until: datetime | None,
) -> ReplayPlan:
    partitions = await inspector.partitions(topic)
    beginning, end = await inspector.log_offsets(topic, partitions)
    starts = await inspector.offsets_for_time(topic, partitions, since)
    stops = await inspector.offsets_for_time(topic, partitions, until) if until is not None else {}
    committed = await inspector.committed(group_id, topic, partitions)
    fresh = all(committed.get(p, beginning[p]) <= beginning[p] for p in partitions)
    # No offset for a time: nothing in that partition is that recent, so the log end.
    plans = (
        PartitionPlan(
            partition=p,
            beginning=beginning[p],
            end=end[p],
            start=_or_end(starts.get(p), end[p]),
            stop=_or_end(stops.get(p), end[p]),
            committed=committed.get(p),
            fresh_group=fresh,
        )
        for p in partitions
    )
    return ReplayPlan(consumer, group_id, topic, since, until, tuple(plans))


def time_range(since: datetime, until: datetime | None) -> str:
    return f"from {since.isoformat()} to " + ("the end" if until is None else until.isoformat())


def render_plan(plan: ReplayPlan, *, bounded: bool) -> str:
    lines = [
        f"consumer {plan.consumer}, group {plan.group_id}, topic {plan.topic}",
        f"records with Kafka timestamps {time_range(plan.since, plan.until)}",
    ]
    rows = [("partition", "from-offset", "to-offset", "records", "committed", "after", "note")]
    for p in plan.partitions:
        after: int | None
        if bounded:
            after = p.committed if p.committed is not None else p.beginning
        else:
            after = p.rewind_to if p.rewind_to is not None else p.committed
        rows.append(
            (
                str(p.partition),
                str(p.start),
                str(p.stop),
                str(p.count),
                "-" if p.committed is None else str(p.committed),
                "-" if after is None else str(after),
                _note(p, bounded=bounded),
            )
        )
    lines += table(rows, right=range(6))
    lines.append(f"total: {plan.total} records")
    return "\n".join(lines) + "\n"


def _note(p: PartitionPlan, *, bounded: bool) -> str:
    notes = []
    if p.start >= p.end:
        notes.append("no record after --from: nothing to replay")
    elif p.count == 0:
        notes.append("no record between --from and --to")
    elif p.start == p.beginning and p.beginning > 0:
        # The first retained record is already inside the range, so older ones that were
        # inside it too may be gone.
        notes.append("starts at the log start: retention may have dropped part of the range")
    if not bounded and p.fresh_group and p.start > p.beginning:
        notes.append("new group: starts here instead of at the log start")
    elif not bounded and p.count > 0:
        if p.committed is None:
            notes.append("no committed offset: the group reads from the log start anyway")
        elif p.committed < p.start:
            notes.append("group has not reached --from yet: left where it is")
    return "; ".join(notes)


def _or_end(offset: int | None, end: int) -> int:
    return end if offset is None else offset
