"""`callstream rejected`: what the quarantine (<topic>.rejected) holds, and getting it back.

* ``rejected list [--since T] [--reason SLUG] [--json]``: the kept requests, oldest first
  (``--json``: one object per line, with ``requestId``; nothing at all when it is empty).
* ``rejected show REQUEST_ID``: one entry as JSON, with its headers and the kept body.
* ``rejected reprocess [--request-id ID | --since T] [--dry-run]``: runs the current normaliser
  again over each QUARANTINED entry's kept bytes and publishes what now passes to the reports
  or events topic, with its original receive time and request id; then records the entry as
  REPROCESSED (the same entry, with where it went), so a second run publishes nothing new.
  A run that stops between the two sends the record again next time: consumers take a call
  again idempotently, as they do after any redelivery.

All read the topic up to its end when the command started, so they finish while the ingress
keeps writing. The latest record per request id is the entry's state; a tombstone (written by
`callstream erase`) removes it.
"""

from __future__ import annotations

import argparse
import base64
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal, TextIO, cast

import aiohttp
import orjson

from callstream.clihelp import command
from callstream.consumerstatus import KafkaInspector
from callstream.progress import track
from callstream.replayplan import parse_time
from core.kafkasettings import KafkaSettings
from core.producer import durable_producer
from core.settings import declared, field_from_env
from core.topicreader import read_range
from ingress.settings import IngressSettings
from schemas import jsonvalue
from schemas.codec import Decoder, encoders_for, topics_by_schema
from schemas.errors import DecodeError, InvalidReport
from schemas.headers import RecordHeaders
from schemas.normalise import Normalised, normalise
from schemas.registry import registry_client
from schemas.rejected import RejectedRequest
from schemas.store import REJECTED_REQUEST, default_store

EXIT_OK = 0
EXIT_NOT_FOUND = 1

Normaliser = Callable[..., Normalised]
_INGRESS = declared(IngressSettings)


@dataclass(frozen=True, slots=True)
class Limits:
    """The ingress's body limits, as configured where `reprocess` runs: a request refused for
    one of them (a body too large once gunzipped, JSON nested too deep) passes once the
    setting is raised."""

    max_body_bytes: int = cast(int, _INGRESS["max_body_bytes"].default)
    max_json_depth: int = cast(int, _INGRESS["max_json_depth"].default)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Limits:
        return cls(
            field_from_env(IngressSettings, "max_body_bytes", env),
            field_from_env(IngressSettings, "max_json_depth", env),
        )


async def load(kafka: KafkaSettings) -> dict[str, RejectedRequest]:
    """Every entry in the quarantine now, by request id, in the order they were kept."""
    async with KafkaInspector(kafka) as look:
        partitions = await look.existing(kafka.rejected_topic)
        if not partitions:
            return {}
        start, end = await look.log_offsets(kafka.rejected_topic, partitions)
    entries: dict[str, RejectedRequest] = {}
    async with aiohttp.ClientSession() as session:
        decoder = Decoder(default_store(), registry_client(kafka, session))
        async for raw in read_range(kafka, kafka.rejected_topic, start, end):
            if raw.key is None:
                continue
            request_id = raw.key.decode(errors="replace")
            if raw.value is None:
                entries.pop(request_id, None)
                continue
            try:
                decoded = await decoder.decode(raw.value)
            except DecodeError:
                continue
            if decoded.name == REJECTED_REQUEST:
                # Re-inserted so the order is that of the latest state.
                entries.pop(request_id, None)
                entries[request_id] = RejectedRequest.from_record(decoded.record)
    return entries


def select(
    entries: dict[str, RejectedRequest],
    *,
    since: datetime | None = None,
    reason: str | None = None,
    request_id: str | None = None,
) -> list[RejectedRequest]:
    since_ms = None if since is None else since.timestamp() * 1000
    return sorted(
        (
            e
            for e in entries.values()
            if (since_ms is None or e.received_at_ms >= since_ms)
            and (reason is None or e.problem == reason)
            and (request_id is None or e.request_id == request_id)
        ),
        key=lambda e: e.received_at_ms,
    )


async def list_command(
    kafka: KafkaSettings,
    out: TextIO,
    *,
    since: datetime | None = None,
    reason: str | None = None,
    as_json: bool = False,
) -> int:
    chosen = select(await load(kafka), since=since, reason=reason)
    if as_json:
        for entry in chosen:
            out.write(orjson.dumps(entry.to_json()).decode() + "\n")
        return EXIT_OK
    out.write(f"{len(chosen)} kept request(s) on {kafka.rejected_topic}\n")
    for e in chosen:
        where = "" if e.pointer is None else f" at {e.pointer or '/'}"
        out.write(
            f"{e.to_json()['receivedAt']}  {e.request_id}  {e.state.lower()}  {e.status}"
            f" {e.problem}{where}: {e.detail}\n"
        )
    return EXIT_OK


async def show_command(kafka: KafkaSettings, request_id: str, out: TextIO, err: TextIO) -> int:
    entry = (await load(kafka)).get(request_id)
    if entry is None:
        err.write(f"no kept request {request_id} on {kafka.rejected_topic}\n")
        return EXIT_NOT_FOUND
    shown: dict[str, Any] = entry.to_json() | {"headers": dict(entry.headers)}
    try:
        shown["body"] = entry.body.decode()
    except UnicodeDecodeError:
        # gzip as sent, or not text at all: still shown, losslessly.
        shown["bodyBase64"] = base64.b64encode(entry.body).decode()
    out.write(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode() + "\n")
    return EXIT_OK


Verdict = Literal["published", "would-publish", "still-refused"]


@dataclass(frozen=True, slots=True)
class Outcome:
    request_id: str
    verdict: Verdict
    topic: str | None = None
    call_id: str | None = None
    why: str | None = None

    def line(self) -> str:
        if self.verdict == "still-refused":
            return f"{self.request_id}: still refused: {self.why}"
        verb = "published" if self.verdict == "published" else "would publish"
        return f"{self.request_id}: {verb} to {self.topic} (call {self.call_id or '-'})"


def renormalise(
    entry: RejectedRequest, normaliser: Normaliser = normalise, limits: Limits = Limits()
) -> Normalised:
    """The entry as the current normaliser sees it, with its original receive time and request
    id; InvalidReport when it still does not pass."""
    body = entry.payload_bytes(limits.max_body_bytes)
    if body is None:
        raise InvalidReport("", "the kept body is cut short or cannot be decoded")
    payload = jsonvalue.parse(body, max_depth=limits.max_json_depth)
    return normaliser(payload, received_at_ms=entry.received_at_ms, request_id=entry.request_id)


async def reprocess(
    kafka: KafkaSettings,
    *,
    request_id: str | None = None,
    since: datetime | None = None,
    dry_run: bool = False,
    normaliser: Normaliser = normalise,
    limits: Limits = Limits(),
) -> list[Outcome]:
    """Publish every QUARANTINED entry (of those chosen) that the normaliser now passes."""
    chosen = [
        e
        for e in select(await load(kafka), since=since, request_id=request_id)
        if e.state == "QUARANTINED"
    ]
    # By request id, in the order the entries were kept; filled in as each is dealt with.
    outcomes: dict[str, Outcome] = {}
    ready: list[tuple[RejectedRequest, Normalised]] = []
    for entry in chosen:
        try:
            event = renormalise(entry, normaliser, limits)
        except InvalidReport as exc:
            at = f" at {exc.pointer}" if exc.pointer else ""
            outcomes[entry.request_id] = Outcome(
                entry.request_id, "still-refused", why=f"{exc.detail}{at}"
            )
            continue
        outcomes[entry.request_id] = Outcome(
            entry.request_id,
            "would-publish",
            topics_by_schema(kafka)[event.schema_name],
            event.call_id,
        )
        ready.append((entry, event))
    if not dry_run and ready:
        await _publish(kafka, ready)
        for entry, _ in ready:
            outcomes[entry.request_id] = replace(outcomes[entry.request_id], verdict="published")
    return list(outcomes.values())


async def _publish(kafka: KafkaSettings, ready: list[tuple[RejectedRequest, Normalised]]) -> None:
    """Each record onto its topic, then its entry marked REPROCESSED; all acknowledged, or
    the first failure raised."""
    async with aiohttp.ClientSession() as session:
        encoders = await encoders_for(kafka, default_store(), session)
    marker = encoders[REJECTED_REQUEST]
    topics = topics_by_schema(kafka)
    async with durable_producer(kafka, "callstream-rejected-reprocess", linger_ms=5) as producer:
        with track("reprocess", len(ready), unit="reports") as bar:
            for entry, event in ready:
                topic, encoder = topics[event.schema_name], encoders[event.schema_name]
                headers = RecordHeaders(
                    event.event_type,
                    encoder.schema_id,
                    encoder.wire_format,
                    event.source_format,
                    entry.request_id,
                )
                # Published first, marked after: a crash in between publishes it again, never
                # marks a record as reprocessed that is not on the topic.
                await producer.send_and_wait(
                    topic,
                    encoder.encode(event.record),
                    key=None if event.call_id is None else event.call_id.encode(),
                    headers=[*headers.encode(), ("reprocessed-from", b"quarantine")],
                )
                kept = entry.reprocessed(int(time.time() * 1000), topic, event.call_id)
                await producer.send_and_wait(
                    kafka.rejected_topic,
                    marker.encode(kept.to_record()),
                    key=entry.request_id.encode(),
                    headers=list(kept.record_headers(marker).encode()),
                )
                bar.advance()


async def reprocess_command(
    kafka: KafkaSettings,
    out: TextIO,
    *,
    request_id: str | None = None,
    since: datetime | None = None,
    dry_run: bool = False,
    limits: Limits = Limits(),
) -> int:
    outcomes = await reprocess(
        kafka, request_id=request_id, since=since, dry_run=dry_run, limits=limits
    )
    for outcome in outcomes:
        out.write(outcome.line() + "\n")
    published = sum(o.verdict == "published" for o in outcomes)
    refused = sum(o.verdict == "still-refused" for o in outcomes)
    if dry_run:
        out.write(
            f"dry run: {len(outcomes) - refused} would be published, {refused} still refused\n"
        )
    else:
        out.write(f"{published} published, {refused} still refused\n")
    return EXIT_OK


async def erase_matching(kafka: KafkaSettings, *, phone: str | None, call_id: str | None) -> int:
    """Tombstones for every entry whose kept body mentions `phone` and/or `call_id` (both:
    both must appear, as `callstream erase` matches storage). Returns how many."""
    wanted = [s.encode() for s in (phone, call_id) if s]
    if not wanted:
        return 0
    matching = [e.request_id for e in (await load(kafka)).values() if mentions(e, wanted)]
    if not matching:
        return 0
    async with durable_producer(kafka, "callstream-erase", linger_ms=5) as producer:
        for request_id in matching:
            await producer.send_and_wait(kafka.rejected_topic, None, key=request_id.encode())
    return len(matching)


def mentions(entry: RejectedRequest, wanted: list[bytes]) -> bool:
    # A body cut short or not decodable is searched as kept: it is the bytes that are erased.
    text = entry.payload_bytes(Limits().max_body_bytes * 16) or entry.body
    return all(w in text for w in wanted)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """`callstream rejected` and its actions (the handlers live with the other commands)."""
    rejected = command(
        sub,
        "rejected",
        "the quarantine: refused requests kept on <topic>.rejected; list, show, reprocess",
        "callstream rejected list --since -1d --reason invalid-report",
        "callstream rejected reprocess --dry-run",
        description=__doc__,
    )
    actions = rejected.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = command(
        actions,
        "list",
        "the kept requests, oldest first",
        "callstream rejected list",
        "callstream rejected list --since -2h --json | jq -r .requestId",
    )
    listing.add_argument("--since", metavar="TIME", type=parse_time, help=_SINCE)
    listing.add_argument("--reason", metavar="SLUG", help="only this problem, e.g. invalid-report")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = command(
        actions,
        "show",
        "one kept request as JSON, body and headers included",
        "callstream rejected show 7f3c2a9e0b1d4c5e",
    )
    show.add_argument("request_id", metavar="REQUEST_ID", help="as `rejected list` shows it")
    again = command(
        actions,
        "reprocess",
        "run the current normaliser over kept requests and publish what now passes",
        "callstream rejected reprocess --dry-run",
        "callstream rejected reprocess --request-id 7f3c2a9e0b1d4c5e",
    )
    which = again.add_mutually_exclusive_group()
    which.add_argument("--request-id", metavar="ID", help="only this request")
    which.add_argument("--since", metavar="TIME", type=parse_time, help=_SINCE)
    again.add_argument("--dry-run", action="store_true", help="say what would pass, send nothing")
    return rejected


_SINCE = "only those received at or after this time: ISO-8601 (UTC unless zoned), or -2h, -7d"
