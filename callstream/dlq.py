"""`callstream dlq`: what the dead-letter topic holds, and sending one consumer's dead letters
back to it once their cause is fixed.

* ``dlq list``: every dead letter, counted per consumer and error type, with how many are
  still waiting for a re-drive (``--json``: one line per dead letter, with its error).
* ``dlq redrive --consumer NAME``: puts NAME's dead letters back on the topic they came
  from, value and key unchanged. Their ``dlq.*`` headers go and a ``redrive-for: NAME``
  header comes, so every other consumer's runner passes over them (it handled them the
  first time) and NAME's runner handles them like any record: a record that still fails
  is dead-lettered again, with the new reason.

Both read the dead-letter topic up to its end when the command started, so they finish
while consumers keep writing to it. Re-drive progress is a consumer group on the
dead-letter topic, ``callstream-dlq-redrive-NAME``, committed only after every re-driven
record was acknowledged: each dead letter goes back once, and a run that failed half-way
sends its records again, which the consumer absorbs because handlers are idempotent.
Run one re-drive per consumer at a time: two at once would both send the same records.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
from aiokafka.errors import KafkaError

from callstream.clihelp import table
from callstream.consumerstatus import KafkaInspector
from callstream.progress import track
from callstream.replay import EXIT_FAILED, EXIT_OK, PUBLISH_WINDOW, all_acked
from consumers.contract import REDRIVE_HEADER
from core.kafkasettings import KafkaSettings
from core.offsets import commit_group_offsets
from core.producer import durable_producer
from core.topicreader import RawRecord, read_range

_DLQ_HEADER_PREFIX = "dlq."
_UNKNOWN = "unknown"


def redrive_group(consumer: str) -> str:
    return f"callstream-dlq-redrive-{consumer}"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: RawRecord
    consumer: str
    error_type: str
    error: str
    origin_topic: str

    @classmethod
    def of(cls, record: RawRecord, default_topic: str) -> DeadLetter:
        # A consumer written in another language may leave headers out: still listable.
        return cls(
            record,
            record.header("dlq.consumer") or _UNKNOWN,
            record.header("dlq.error.type") or _UNKNOWN,
            record.header("dlq.error") or "",
            record.header("dlq.topic") or default_topic,
        )

    def redrive_headers(self) -> list[tuple[str, bytes]]:
        kept = [
            (name, value)
            for name, value in self.record.headers
            if not name.startswith(_DLQ_HEADER_PREFIX) and name != REDRIVE_HEADER
        ]
        return [*kept, (REDRIVE_HEADER, self.consumer.encode())]

    def to_json(self, redriven: bool) -> dict[str, Any]:
        r = self.record
        return {
            "partition": r.partition,
            "offset": r.offset,
            "dead_lettered_at": _iso(r.timestamp_ms),
            "consumer": self.consumer,
            "error_type": self.error_type,
            "error": self.error,
            "key": None if r.key is None else r.key.decode(errors="replace"),
            "origin": {
                "topic": self.origin_topic,
                "partition": _int_or_none(r.header("dlq.partition")),
                "offset": _int_or_none(r.header("dlq.offset")),
            },
            "redrive_for": r.header(REDRIVE_HEADER),
            "redriven": redriven,
        }


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The dead-letter topic's partitions as the command found them."""

    beginning: dict[int, int]
    end: dict[int, int]

    def after(self, committed: Mapping[int, int]) -> dict[int, int]:
        """Where a re-drive group resumes: its commit, or the log start (retention may
        have dropped what it had not reached yet). A commit past the end means the topic
        was deleted and created again: it counts as none."""
        return {
            p: b if self.stale(committed, p) else max(committed.get(p, b), b)
            for p, b in self.beginning.items()
        }

    def stale(self, committed: Mapping[int, int], partition: int) -> bool:
        return committed.get(partition, 0) > self.end[partition]


async def _snapshot(look: KafkaInspector, topic: str) -> Snapshot | None:
    partitions = await look.existing(topic)
    if not partitions:
        return None
    beginning, end = await look.log_offsets(topic, partitions)
    return Snapshot(beginning, end)


async def list_command(
    kafka: KafkaSettings, out: TextIO, *, consumer: str | None = None, as_json: bool = False
) -> int:
    topic = kafka.dlq_topic
    async with KafkaInspector(kafka) as look:
        snapshot = await _snapshot(look, topic)
        if snapshot is None:
            if not as_json:
                out.write(f"no dead letters: {topic} does not exist yet\n")
            return EXIT_OK
        letters = [
            DeadLetter.of(r, kafka.topic)
            async for r in read_range(kafka, topic, snapshot.beginning, snapshot.end)
        ]
        if consumer is not None:
            letters = [d for d in letters if d.consumer == consumer]
        resume_at: dict[str, dict[int, int]] = {}
        for name in sorted({d.consumer for d in letters}):
            committed = await look.committed(redrive_group(name), topic, snapshot.beginning)
            resume_at[name] = snapshot.after(committed)

    def redriven(d: DeadLetter) -> bool:
        return d.record.offset < resume_at[d.consumer][d.record.partition]

    if as_json:
        for d in letters:
            out.write(orjson.dumps(d.to_json(redriven(d))).decode() + "\n")
        return EXIT_OK
    out.write(f"{len(letters)} dead letter(s) on {topic}\n")
    if letters:
        out.write(_table(letters, redriven))
    return EXIT_OK


def _table(letters: list[DeadLetter], redriven: Callable[[DeadLetter], bool]) -> str:
    counts = Counter((d.consumer, d.error_type) for d in letters)
    waiting = Counter((d.consumer, d.error_type) for d in letters if not redriven(d))
    newest: dict[tuple[str, str], int] = {}
    for d in letters:
        group = (d.consumer, d.error_type)
        newest[group] = max(newest.get(group, 0), d.record.timestamp_ms)
    rows = [("CONSUMER", "ERROR TYPE", "COUNT", "NOT RE-DRIVEN", "NEWEST")]
    rows += [
        (name, kind, str(n), str(waiting[(name, kind)]), _iso(newest[(name, kind)]))
        for (name, kind), n in sorted(counts.items())
    ]
    return "".join(line + "\n" for line in table(rows))


async def redrive_command(
    kafka: KafkaSettings, consumer: str, out: TextIO, err: TextIO, *, dry_run: bool = False
) -> int:
    topic, group = kafka.dlq_topic, redrive_group(consumer)
    async with KafkaInspector(kafka) as look:
        snapshot = await _snapshot(look, topic)
        if snapshot is None:
            out.write(f"nothing to re-drive: {topic} does not exist yet\n")
            return EXIT_OK
        committed = await look.committed(group, topic, snapshot.beginning)
        for p in sorted(p for p in committed if snapshot.stale(committed, p)):
            err.write(
                f"{group} is past the end of {topic}[{p}] (was the topic created again?):"
                " reading that partition from its start\n"
            )
        start = snapshot.after(committed)
        # Counted first, so that a dead letter whose topic is gone stops the run before
        # anything is sent (with auto-creation on, sending would make a topic nobody reads).
        origins = Counter[str]()
        async for record in read_range(kafka, topic, start, snapshot.end):
            letter = DeadLetter.of(record, kafka.topic)
            if letter.consumer == consumer:
                origins[letter.origin_topic] += 1
        missing = [t for t in sorted(origins) if not await look.existing(t)]
    found = sum(origins.values())
    out.write(f"{found} dead letter(s) of {consumer} not yet re-driven\n")
    if missing:
        err.write(
            f"nothing re-driven: {', '.join(missing)} no longer exist(s); create the topic,"
            " or move its dead letters on by hand\n"
        )
        return EXIT_FAILED
    if dry_run:
        for origin, n in sorted(origins.items()):
            out.write(f"would re-drive {n} onto {origin}\n")
        out.write("dry run: nothing re-driven\n")
        return EXIT_OK
    try:
        sent = Counter[str]()
        if found:
            with track(f"re-drive {consumer}", found, unit="dead letters", stream=err) as bar:
                sent = await _send_back(kafka, consumer, start, snapshot.end, bar.advance)
        await commit_group_offsets(kafka, group, topic, snapshot.end)
    except KafkaError as exc:
        # Nothing marked as re-driven: the next run sends this run's records again, and
        # the consumer absorbs the repeats.
        err.write(f"re-drive failed, nothing marked as re-driven: {exc}\n")
        return EXIT_FAILED
    for origin, n in sorted(sent.items()):
        out.write(f"re-drove {n} onto {origin}; `callstream consumer {consumer}` handles them\n")
    return EXIT_OK


async def _send_back(
    kafka: KafkaSettings,
    consumer: str,
    start: Mapping[int, int],
    end: Mapping[int, int],
    acked: Callable[[int], None],
) -> Counter[str]:
    """Every dead letter of `consumer` in [start, end) onto its topic; all acknowledged
    (`acked` hears how many more each time)."""
    sent = Counter[str]()
    async with durable_producer(kafka, "callstream-dlq-redrive", linger_ms=5) as producer:
        pending: list[asyncio.Future[Any]] = []
        async for record in read_range(kafka, kafka.dlq_topic, start, end):
            letter = DeadLetter.of(record, kafka.topic)
            if letter.consumer != consumer:
                continue
            pending.append(
                await producer.send(
                    letter.origin_topic,
                    record.value,
                    key=record.key,
                    headers=letter.redrive_headers(),
                )
            )
            sent[letter.origin_topic] += 1
            if len(pending) >= PUBLISH_WINDOW:
                acked(await all_acked(pending))
        acked(await all_acked(pending))
    return sent


def _iso(timestamp_ms: int) -> str:
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).isoformat(timespec="seconds")


def _int_or_none(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None
