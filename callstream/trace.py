"""`callstream trace CALL_ID`: where one call went, from every place that keeps a trace of it.

Kafka is read by key, not scanned: a call's records all carry its id as their key, and the
producer's default partitioner (murmur2 of the key, modulo the partition count) puts them on
one partition of each topic. Trace computes that partition for the reports topic, the events
topic and the dead-letter topic and reads only the last `lookback` records of each, so it
takes the same time however large the topics grow; what it looked at is part of its output.
`--request-id` cannot know the partition (the request id is a header, not the key), so it
reads the same window of every partition of the two topics to find the call first.

Every other source is optional: a section whose source is not configured says so in one
line. Nothing here writes to Kafka, the spool or the alert state. No phone number,
transcript or summary is shown: the output lands in terminals and tickets.

The exit code is 0 when anything names the call, 1 when nothing does (as grep), 2 when Kafka
cannot be read.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import orjson
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from callstream import alerts, rejected
from callstream.consumerstatus import KafkaInspector, registered_consumers
from callstream.dlq import DeadLetter, redrive_group
from callstream.tracerender import render_text
from consumers.alerting.settings import AlertingSettings
from consumers.alerting.state import AlertState, StateUnavailable
from consumers.errors import PermanentError, RetryableError
from consumers.storage import ErasureLog, StorageBackend, StorageSettings, sha256_hex
from consumers.storage.connections import Connection, PostgresConnection, SqliteConnection
from consumers.storage.dialects import Dialect
from consumers.storage.statements import Script
from core.kafkasettings import KafkaSettings
from core.settings import field_from_env
from core.topicreader import RawRecord, read_range
from ingress.publisher import decode_record
from ingress.settings import IngressSettings
from ingress.spoolformat import read_pending
from ingress.takeover import siblings
from schemas.codec import Decoder
from schemas.errors import DecodeError
from schemas.headers import NAMES as HEADER_NAMES
from schemas.registry import registry_client
from schemas.store import default_store

EXIT_FOUND = 0
EXIT_NOT_FOUND = 1
EXIT_KAFKA = 2
# Records per partition read back from each topic's end: a few days of one partition's
# traffic at a typical call centre's volume, read in about a second.
DEFAULT_LOOKBACK = 10_000

Json = dict[str, Any]


def key_partition(key: bytes, partitions: Sequence[int]) -> int:
    """The partition the producer sends `key` to, among `partitions` (aiokafka's default
    partitioner, which both the ingress and the dead-letter path use)."""
    ordered = sorted(partitions)
    return int(DefaultPartitioner()(key, ordered, ordered))


@dataclass(frozen=True, slots=True)
class Window:
    """The offsets of one partition that trace read."""

    topic: str
    partition: int
    start: int
    end: int
    log_start: int

    def to_json(self) -> Json:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "from_offset": self.start,
            "to_offset": self.end,
            # True: the window reached the log start, so nothing older exists on Kafka.
            "whole_partition": self.start <= self.log_start,
        }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _iso_ms(millis: int | None) -> str | None:
    return None if millis is None else _iso(datetime.fromtimestamp(millis / 1000, UTC))


def _millis(value: Any) -> int | None:
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return int(aware.timestamp() * 1000)
    return value if isinstance(value, int) else None


class _Kafka:
    """Bounded reads by key, and the decoding of what they find."""

    def __init__(self, kafka: KafkaSettings, look: KafkaInspector, decoder: Decoder) -> None:
        self.kafka = kafka
        self.look = look
        self.decoder = decoder
        self.windows: list[Window] = []
        self.missing: list[str] = []
        # The caller's number, hashed as the erasure log keeps it: to find erasures by
        # number. Never output (a number's hash is as good as the number to anyone with a
        # phone book).
        self.phone_hashes: set[str] = set()

    async def window(self, topic: str, key: bytes | None, lookback: int) -> list[RawRecord]:
        """The last `lookback` records of the key's partition, only that key's; without a
        key, of every partition."""
        partitions = await self.look.existing(topic)
        if not partitions:
            self.missing.append(topic)
            return []
        chosen = [key_partition(key, partitions)] if key is not None else partitions
        beginning, end = await self.look.log_offsets(topic, chosen)
        start = {p: max(beginning[p], end[p] - lookback) for p in chosen}
        self.windows += [Window(topic, p, start[p], end[p], beginning[p]) for p in chosen]
        return [
            raw
            async for raw in read_range(self.kafka, topic, start, end)
            if key is None or raw.key == key
        ]

    async def version(self, raw: RawRecord, groups: Mapping[str, str]) -> Json:
        """One record of the call on the reports or events topic, decoded as far as it goes,
        and whether each consumer group has handled it."""
        out: Json = {
            "topic": raw.topic,
            "partition": raw.partition,
            "offset": raw.offset,
            "published_at": _iso_ms(raw.timestamp_ms),
        }
        out |= {field: raw.header(name) for field, name in HEADER_NAMES.items()}
        try:
            decoded = await self.decoder.decode(raw.value)
        except DecodeError as exc:
            out["decode_error"] = str(exc)
        else:
            record = decoded.record
            source = record.get("source") or {}
            out["event_type"] = record.get("event_type") or out["event_type"]
            out["event_time"] = _iso_ms(_millis(record.get("event_time")))
            out["received_at"] = _iso_ms(_millis(source.get("received_at")))
            out["request_id"] = source.get("request_id") or out["request_id"]
            out["source_format"] = source.get("format") or out["source_format"]
            if record.get("from_number") is not None:
                self.phone_hashes.add(sha256_hex(record["from_number"].strip()))
        out["groups"] = {}
        for name, group in groups.items():
            found = await self.look.committed(group, raw.topic, [raw.partition])
            committed = found.get(raw.partition)
            if committed is None:
                state = "no commit"
            elif committed > raw.offset:
                state = "handled"
            else:
                state = f"behind by {raw.offset - committed + 1}"
            out["groups"][name] = {"group_id": group, "committed": committed, "state": state}
        return out

    async def dead_letters(self, call_id: bytes, lookback: int) -> list[Json]:
        topic = self.kafka.dlq_topic
        out = []
        for raw in await self.window(topic, call_id, lookback):
            letter = DeadLetter.of(raw, self.kafka.topic)
            committed = await self.look.committed(
                redrive_group(letter.consumer), topic, [raw.partition]
            )
            out.append(letter.to_json(raw.offset < committed.get(raw.partition, 0)))
        return out


async def _find_call(
    kafka: _Kafka, request_id: str, lookback: int, spool: list[Json]
) -> str | None:
    for entry in spool:
        if entry["request_id"] == request_id and entry["call_id"] is not None:
            return str(entry["call_id"])
    for topic in (kafka.kafka.topic, kafka.kafka.events_topic):
        for raw in await kafka.window(topic, None, lookback):
            if raw.header(HEADER_NAMES["request_id"]) == request_id and raw.key is not None:
                return raw.key.decode(errors="replace")
    return None


def _spool(env: Mapping[str, str]) -> tuple[Json, list[Json]]:
    """Every report the ingress's spool still holds (all calls: filtered by the caller)."""
    directory: Path | None = field_from_env(IngressSettings, "spool_dir", env)
    if directory is None or not directory.is_dir():
        return {
            "available": False,
            "note": f"no spool directory at {directory} (CALLSTREAM_SPOOL_DIR)",
        }, []
    entries = []
    # With several ingress workers each spools to a directory of its own under this one.
    for place in (directory, *siblings(directory)):
        for pending in read_pending(place):
            try:
                record = decode_record(pending.payload)
            except ValueError:
                continue
            headers = dict(record.headers)
            entries.append(
                {
                    "call_id": None if record.key is None else record.key.decode(errors="replace"),
                    "topic": record.topic,
                    "spooled_at": _iso_ms(pending.spooled_at_ms),
                    "segment": pending.position.segment,
                    "position": pending.position.offset,
                }
                | {
                    field: (headers[name].decode(errors="replace") if name in headers else None)
                    for field, name in HEADER_NAMES.items()
                }
            )
    return {"available": True, "directory": str(directory)}, entries


def _receptions(
    versions: Sequence[Json], spooled: Sequence[Json], ack_deadline: float
) -> list[Json]:
    """One line per ingress request that produced the call's records: on Kafka, or still in
    the spool. A record that reached Kafka later than the ingress waits for Kafka's
    acknowledgement went through the spool (told by its timestamps: the record has no mark)."""
    seen: dict[str, Json] = {}
    for v in versions:
        rid = v.get("request_id") or f"{v['topic']}[{v['partition']}]@{v['offset']}"
        received = v.get("received_at")
        delay = None
        if received is not None and v["published_at"] is not None:
            delay = (
                datetime.fromisoformat(v["published_at"]) - datetime.fromisoformat(received)
            ).total_seconds()
        seen.setdefault(
            rid,
            {
                "request_id": v.get("request_id"),
                "received_at": received,
                "source_format": v.get("source_format"),
                "event_type": v.get("event_type"),
                "durable": "kafka",
                "through_spool": None if delay is None else delay > ack_deadline,
                "published_after_seconds": None if delay is None else round(max(delay, 0.0), 3),
            },
        )
    for s in spooled:
        seen.setdefault(
            s["request_id"] or f"spool {s['segment']}:{s['position']}",
            {
                "request_id": s["request_id"],
                "received_at": None,
                "spooled_at": s["spooled_at"],
                "source_format": s["source_format"],
                "event_type": s["event_type"],
                "durable": "spool",
                "through_spool": True,
                "published_after_seconds": None,
            },
        )
    return sorted(seen.values(), key=lambda r: r.get("received_at") or r.get("spooled_at") or "")


def _absent(path: Path, what: str, setting: str) -> Json | None:
    """A section's one line when its file is not there (opening it would create it)."""
    if path.is_file():
        return None
    return {"available": False, "note": f"no {what} at {path} ({setting})"}


def _no_migrations(dialect: Dialect) -> tuple[Script[None], ...]:
    return ()


def _reader(settings: StorageSettings) -> Callable[[], Connection]:
    """Connections that only look: no migration, no table created (the storage consumer
    does that), so a trace never changes nor locks the schema of a database in use."""
    if settings.database_url is not None:
        dsn = settings.database_url.reveal()
        return lambda: PostgresConnection(dsn, _no_migrations, max_connections=1)
    path = settings.sqlite_path
    return lambda: SqliteConnection(path, _no_migrations)


async def _storage(
    env: Mapping[str, str], call_id: str, phones: set[str]
) -> tuple[Json, Json, Json]:
    """The stored row, the status-update timeline and the erasures that cover the call."""
    settings = StorageSettings.from_env(env)
    if settings.database_url is None:
        where = "CALLSTREAM_SQLITE_PATH; CALLSTREAM_DATABASE_URL for PostgreSQL"
        if (absent := _absent(settings.sqlite_path, "storage database", where)) is not None:
            return absent, absent, absent
    connect = _reader(settings)
    backend = StorageBackend(connect())
    try:
        row = await backend.fetch(call_id)
        events = await backend.timeline(call_id)
        erasures = await ErasureLog(connect).entries()
    except (RetryableError, PermanentError) as exc:
        off = {"available": False, "note": f"storage database: {exc}"}
        return off, off, off
    finally:
        await backend.close()
    stored: Json = {"available": True, "row": None}
    if row is not None:
        stored["row"] = {
            "event_type": row.event_type,
            "event_time": _iso(row.event_time),
            "call_status": row.call_status,
            "ended_reason": row.ended_reason,
            "request_id": row.request_id,
            "received_at": _iso(row.received_at),
            "kafka_partition": row.kafka_partition,
            "kafka_offset": row.kafka_offset,
            "stored_at": _iso(row.stored_at),
        }
        if row.from_number is not None:
            phones.add(sha256_hex(row.from_number.strip()))
    timeline = {
        "available": True,
        "events": [
            {
                "event_time": _iso(e.event_time),
                "status": e.status,
                "ended_reason": e.ended_reason,
                "error": e.error,
                "request_id": e.request_id,
                "kafka_partition": e.kafka_partition,
                "kafka_offset": e.kafka_offset,
                "stored_at": _iso(e.stored_at),
            }
            for e in events
        ],
    }
    call_hash = sha256_hex(call_id)
    matching = [
        {
            "id": e.id,
            "kind": e.kind,
            "requested_at": _iso(e.requested_at),
            "completed_at": _iso(e.completed_at),
            "rows_deleted": e.rows_deleted,
            "by": "call id" if e.call_id_sha256 == call_hash else "caller's number",
        }
        for e in erasures
        if (e.kind in ("call", "phone+call") and e.call_id_sha256 == call_hash)
        or (e.kind == "phone" and e.phone_sha256 in phones)
    ]
    return stored, timeline, {"available": True, "entries": matching}


async def _alerts(env: Mapping[str, str], call_id: str) -> Json:
    path: Path = field_from_env(AlertingSettings, "state_path", env)
    if (absent := _absent(path, "alert state file", "CALLSTREAM_ALERT_STATE_PATH")) is not None:
        return absent
    state = AlertState(
        path, busy_timeout=field_from_env(AlertingSettings, "state_busy_timeout", env)
    )
    try:
        history = await alerts.history(state, since=None, failed_only=False)
    except StateUnavailable as exc:
        return {"available": False, "note": str(exc)}
    shown = ("rule", "channel", "status", "attempts", "error", "updated_at")
    return {
        "available": True,
        "alerts": [
            {name: full[name] for name in shown}
            for full in map(alerts.record_json, history)
            if full["call_id"] == call_id
        ],
    }


async def _quarantine(kafka: KafkaSettings, call_id: str, request_ids: set[str]) -> Json:
    """The refused requests that name the call: reprocessed to it, sent as one of its
    requests, or whose kept body mentions its id (a report refused before it could be
    keyed). The quarantine is compacted and small, so it is read whole."""
    try:
        entries = await rejected.load(kafka)
    except KafkaError as exc:
        return {"available": False, "note": f"the quarantine could not be read ({exc})"}
    wanted = [call_id.encode()]
    return {
        "available": True,
        "topic": kafka.rejected_topic,
        "entries": [
            {
                "request_id": e.request_id,
                "state": e.state,
                "problem": e.problem,
                "status": e.status,
                "received_at": _iso_ms(e.received_at_ms),
            }
            for e in entries.values()
            if e.call_id == call_id or e.request_id in request_ids or rejected.mentions(e, wanted)
        ],
    }


async def collect(
    kafka: KafkaSettings,
    env: Mapping[str, str],
    *,
    call_id: str | None,
    request_id: str | None,
    lookback: int,
) -> Json:
    spool_section, spooled = _spool(env)
    async with KafkaInspector(kafka) as look, aiohttp.ClientSession() as session:
        reader = _Kafka(kafka, look, Decoder(default_store(), registry_client(kafka, session)))
        if call_id is None:
            assert request_id is not None
            call_id = await _find_call(reader, request_id, lookback, spooled)
        doc: Json = {
            "call_id": call_id,
            "request_id": request_id,
            "lookback": {"records_per_partition": lookback},
        }
        if call_id is None:
            doc["lookback"] |= _looked(reader)
            return doc | {"found": False, "spool": spool_section | {"entries": []}}
        key = call_id.encode()
        groups = {name: watched.group_id for name, watched in registered_consumers().items()}
        versions = [
            await reader.version(raw, groups)
            for topic in (kafka.topic, kafka.events_topic)
            for raw in await reader.window(topic, key, lookback)
        ]
        dead = await reader.dead_letters(key, lookback)
    spool_section["entries"] = [s for s in spooled if s["call_id"] == call_id]
    stored, timeline, erasures = await _storage(env, call_id, reader.phone_hashes)
    ack_deadline = float(field_from_env(IngressSettings, "kafka_ack_deadline_seconds", env))
    doc["lookback"] |= _looked(reader)
    doc |= {
        "receptions": _receptions(versions, spool_section["entries"], ack_deadline),
        "versions": versions,
        "spool": spool_section,
        "storage": stored,
        "timeline": timeline,
        "alerts": await _alerts(env, call_id),
        "dead_letters": {"available": True, "entries": dead},
        "quarantine": await _quarantine(
            kafka, call_id, {r for v in versions if (r := v.get("request_id"))}
        ),
        "erasures": erasures,
    }
    doc["found"] = _found(doc)
    return doc


def _looked(reader: _Kafka) -> Json:
    return {
        # --request-id reads every partition first, then the call's again: each one once.
        "windows": [w.to_json() for w in dict.fromkeys(reader.windows)],
        "missing_topics": sorted(set(reader.missing)),
    }


def _found(doc: Json) -> bool:
    return bool(
        doc["versions"]
        or doc["storage"].get("row")
        or doc["timeline"].get("events")
        or doc["alerts"].get("alerts")
        or any(doc[s].get("entries") for s in ("spool", "dead_letters", "quarantine", "erasures"))
    )


async def trace_command(
    kafka: KafkaSettings,
    env: Mapping[str, str],
    out: TextIO,
    *,
    call_id: str | None,
    request_id: str | None,
    lookback: int,
    as_json: bool,
) -> int:
    try:
        doc = await collect(kafka, env, call_id=call_id, request_id=request_id, lookback=lookback)
    except KafkaError as exc:
        sys.stderr.write(f"callstream trace: Kafka at {kafka.bootstrap_servers}: {exc}\n")
        return EXIT_KAFKA
    if as_json:
        out.write(orjson.dumps(doc).decode() + "\n")
    else:
        out.write(render_text(doc))
    return EXIT_FOUND if doc["found"] else EXIT_NOT_FOUND
