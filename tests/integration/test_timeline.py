"""A call's timeline: status updates from the events topic in `call_events`, on SQLite and
PostgreSQL; idempotent on redelivery and replay; erased and purged with the call.

The storage-level tests build events the way the runner hands them over (the payloads of
tests/data/payloads, normalised, through Avro, decoded); the pipeline tests POST them to a
real ingress and run the storage consumer through the real runner on a real broker.
"""

from __future__ import annotations

import copy
import itertools
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from callstream.erase import erase, purge
from consumers.contract import DecodedDelivery, Delivery, EventDelivery
from consumers.storage import StorageConsumer, StorageSettings, build
from core.kafkasettings import KafkaSettings
from core.secret import Secret
from core.signing import WEBHOOK_PATH
from schemas.codec import Decoder, single_object_encoder
from schemas.events import FlireoEvent
from schemas.normalise import normalise
from schemas.report import CallReport
from schemas.store import END_OF_CALL_REPORT, FLIREO_EVENT, default_store
from tests.conftest import TEST_SECRET, Client, wait_drained
from tests.signing import signed
from tests.support.paths import DATA
from tests.support.runner import eventually
from tests.support.runner import running as running_runner
from tests.support.storage import raw_row

EVENT_ENCODER = single_object_encoder(default_store().current(FLIREO_EVENT))
REPORT_ENCODER = single_object_encoder(default_store().current(END_OF_CALL_REPORT))
DECODER = Decoder(default_store())
_OFFSETS = itertools.count()
RECEIVED_MS = 1_767_800_000_000

# payload -> (call id, event time, status, ended reason, error, caller), as INDEX.md has them.
STATUS_UPDATES: dict[str, tuple[str, str, str, str | None, str | None, str]] = {
    "flireo-flat-status-update.json": (
        "7b1e2c94-3f0a-4d6b-9a51-0c2d8e4f6a13",
        "2025-10-09T10:22:40.700Z",
        "in-progress",
        None,
        None,
        "+31687654321",
    ),
    "flireo-flat-status-update-debugging.json": (
        "0e9d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b",
        "2025-10-09T11:23:21.250Z",
        "ended-with-debugging",
        None,
        "Assistant request returned no assistant configuration.",
        "+31611122233",
    ),
    "flireo-nested-camel-status-update.json": (
        "3a8f1d2e-6b7c-4e9f-a0b1-c2d3e4f5a6b7",
        "2026-01-15T09:40:04.000Z",
        "ended-with-error",
        None,
        "TTS provider timeout",
        "+31633344455",
    ),
    "flireo-nested-snake-status-update.json": (
        "c4d5e6f7-0809-4a1b-9c2d-3e4f5a6b7c8d",
        "2026-02-03T14:04:31.000Z",
        "in-progress",
        None,
        None,
        "+31644455566",
    ),
    "vapi-status-update.json": (
        "b7c8d9e0-f1a2-4b3c-9d4e-5f6a7b8c9d0e",
        "2026-01-07T08:00:23.400Z",
        "ended",
        "assistant-ended-call",
        None,
        "+31666677788",
    ),
}
# Events the storage consumer reads and leaves out of the timelines.
NOT_STATUS_UPDATES = ("flireo-sdk-minimal-status-update.json", "vapi-transcript.json")
VAPI_CALL = "b7c8d9e0-f1a2-4b3c-9d4e-5f6a7b8c9d0e"
VAPI_CALLER = "+31666677788"


def payload(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads((DATA / "payloads" / name).read_bytes())
    return loaded


def event(body: dict[str, Any], *, request_id: str | None = None) -> EventDelivery:
    normalised = normalise(
        body, received_at_ms=RECEIVED_MS, request_id=request_id or uuid.uuid4().hex
    )
    value = EVENT_ENCODER.encode(normalised.record)
    decoded = FlireoEvent.from_record(DECODER.decode_local(value).record)
    return EventDelivery(decoded, "flireo.events", 0, next(_OFFSETS), value)


def report(body: dict[str, Any]) -> Delivery:
    normalised = normalise(body, received_at_ms=RECEIVED_MS, request_id=uuid.uuid4().hex)
    value = REPORT_ENCODER.encode(normalised.record)
    record = DECODER.decode_local(value).record
    CallReport.check_record(record)  # as the runner does
    topic = "flireo.end-of-call-report"
    return DecodedDelivery(None, topic, 0, next(_OFFSETS), value, record=record)


def vapi_update(status: str, at: str, **more: Any) -> EventDelivery:
    body = copy.deepcopy(payload("vapi-status-update.json"))
    body["message"] |= {"status": status, "timestamp": at, **more}
    if status != "ended":
        del body["message"]["endedReason"], body["message"]["call"]["endedReason"]
    return event(body)


def settings_of(env: dict[str, str]) -> StorageSettings:
    url = env.get("CALLSTREAM_DATABASE_URL")
    if url is not None:
        return StorageSettings(database_url=Secret(url))
    return StorageSettings.from_env(env)


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def events_count(consumer: StorageConsumer) -> int:
    rows = await consumer.backend._query("SELECT count(*) FROM call_events")
    return int(rows[0][0])


def skipped(registry: CollectorRegistry, backend: str, reason: str) -> float:
    labels = {"backend": backend, "reason": reason}
    return registry.get_sample_value("callstream_storage_events_skipped_total", labels) or 0.0


# -- the table -------------------------------------------------------------------------------


async def test_each_formats_status_update_lands_with_its_columns(
    consumer: StorageConsumer, storage_env: dict[str, str], backend_name: str
) -> None:
    batch = [event(payload(name)) for name in [*STATUS_UPDATES, *NOT_STATUS_UPDATES]]
    await consumer.handle_events(batch)

    assert await events_count(consumer) == len(STATUS_UPDATES)
    for name, (call, at, status, ended, error, caller) in STATUS_UPDATES.items():
        [stored] = await consumer.backend.timeline(call)
        delivery = next(d for d in batch if d.event.call_id == call)
        assert (stored.event_time, stored.event_time_source) == (_utc(at), "sent"), name
        assert (stored.status, stored.ended_reason, stored.error) == (status, ended, error), name
        assert stored.from_number == caller, name
        assert stored.event_type == "status-update"
        assert stored.request_id == delivery.event.request_id
        assert stored.received_at == delivery.event.received_at
        assert (stored.kafka_partition, stored.kafka_offset) == (0, delivery.offset)
    (time_type,) = await raw_row(
        storage_env,
        "SELECT typeof(event_time) FROM call_events LIMIT 1",
        "SELECT pg_typeof(event_time)::text FROM call_events LIMIT 1",
    )
    assert time_type == ("text" if backend_name == "sqlite" else "timestamp with time zone")


async def test_an_update_without_a_time_is_placed_at_its_receipt(
    consumer: StorageConsumer,
) -> None:
    body = payload("flireo-nested-snake-status-update.json")
    del body["message"]["timestamp"]
    await consumer.handle_events([event(body)])

    [stored] = await consumer.backend.timeline("c4d5e6f7-0809-4a1b-9c2d-3e4f5a6b7c8d")
    received = datetime.fromtimestamp(RECEIVED_MS / 1000, UTC)
    assert (stored.event_time, stored.event_time_source) == (received, "received")


async def test_redelivered_updates_add_no_rows(
    consumer: StorageConsumer, registry: CollectorRegistry, backend_name: str
) -> None:
    batch = [event(payload(name)) for name in STATUS_UPDATES]
    await consumer.handle_events(batch)
    # Again, and each twice in one batch: a redelivery after a crash, a replay.
    await consumer.handle_events([*batch, *batch])

    assert await events_count(consumer) == len(STATUS_UPDATES)
    assert skipped(registry, backend_name, "duplicate") == 2 * len(STATUS_UPDATES)


async def test_a_calls_timeline_is_queried_next_to_its_report(
    consumer: StorageConsumer, storage_env: dict[str, str]
) -> None:
    await consumer.handle([report(payload("vapi-end-of-call.json"))])
    await consumer.handle_events(
        [
            vapi_update("ended", "2026-01-07T08:00:23.400Z"),
            vapi_update("ringing", "2026-01-07T07:59:58.200Z"),
            vapi_update("in-progress", "2026-01-07T08:00:00.100Z"),
        ]
    )

    timeline = await consumer.backend.timeline(VAPI_CALL)
    assert [s.status for s in timeline] == ["ringing", "in-progress", "ended"]
    # The query docs/storage.md shows.
    query = (
        "SELECT r.call_id, r.ended_reason, e.event_time, e.status FROM call_reports r"
        " JOIN call_events e ON e.call_id = r.call_id WHERE r.call_id = {}"
        " ORDER BY e.event_time"
    )
    row = await raw_row(storage_env, query.format("?"), query.format("$1"), VAPI_CALL)
    assert row[:2] == (VAPI_CALL, "assistant-ended-call")
    assert row[3] == "ringing"


# -- erasure and retention -------------------------------------------------------------------


async def test_erasing_a_call_removes_its_timeline_and_a_replay_keeps_it_away(
    consumer: StorageConsumer, storage_env: dict[str, str], registry: CollectorRegistry
) -> None:
    updates = [event(payload(name)) for name in STATUS_UPDATES]
    await consumer.handle([report(payload("vapi-end-of-call.json"))])
    await consumer.handle_events(updates)

    outcome = await erase(settings_of(storage_env), call_id=VAPI_CALL)

    assert outcome.rows == 2  # the report and its one status update
    assert await consumer.backend.timeline(VAPI_CALL) == []
    assert await events_count(consumer) == len(STATUS_UPDATES) - 1
    await consumer.handle_events(updates)  # the events topic read again
    assert await consumer.backend.timeline(VAPI_CALL) == []
    assert skipped(registry, consumer.backend.name, "erased") == 1


async def test_erasing_a_caller_removes_the_timelines_of_their_calls(
    consumer: StorageConsumer, storage_env: dict[str, str]
) -> None:
    with_number = vapi_update("in-progress", "2026-01-07T08:00:00.100Z")
    # An update that does not carry the number: found through the call's report.
    without_number = vapi_update("ended", "2026-01-07T08:00:23.400Z", customer=None)
    other = event(payload("flireo-flat-status-update.json"))
    await consumer.handle([report(payload("vapi-end-of-call.json"))])
    await consumer.handle_events([with_number, without_number, other])
    assert len(await consumer.backend.timeline(VAPI_CALL)) == 2

    outcome = await erase(settings_of(storage_env), phone=VAPI_CALLER)

    assert outcome.rows == 3
    assert await consumer.backend.timeline(VAPI_CALL) == []
    assert await events_count(consumer) == 1  # the other caller's
    await consumer.handle_events([with_number])
    assert await consumer.backend.timeline(VAPI_CALL) == []


async def test_erasing_by_caller_and_call_leaves_the_callers_other_calls(
    consumer: StorageConsumer, storage_env: dict[str, str]
) -> None:
    mine = vapi_update("ended", "2026-01-07T08:00:23.400Z")
    body = payload("vapi-status-update.json")
    body["message"]["call"]["id"] = other_call = str(uuid.uuid4())
    await consumer.handle_events([mine, event(body)])

    await erase(settings_of(storage_env), phone=VAPI_CALLER, call_id=VAPI_CALL)

    assert await consumer.backend.timeline(VAPI_CALL) == []
    assert len(await consumer.backend.timeline(other_call)) == 1


async def test_retention_purges_old_status_updates(
    consumer: StorageConsumer, storage_env: dict[str, str]
) -> None:
    now = datetime.now(UTC)
    old = (now - timedelta(days=40)).isoformat().replace("+00:00", "Z")
    recent = (now - timedelta(days=1)).isoformat().replace("+00:00", "Z")
    await consumer.handle_events([vapi_update("ringing", old), vapi_update("in-progress", recent)])

    outcome = await purge(settings_of(storage_env), timedelta(days=30))

    assert outcome.rows == 1
    assert [s.status for s in await consumer.backend.timeline(VAPI_CALL)] == ["in-progress"]


# -- through the ingress, Kafka and the runner ------------------------------------------------


async def test_posted_status_updates_reach_the_timeline_once_even_when_read_again(
    ingress: Client, kafka: KafkaSettings, storage_env: dict[str, str]
) -> None:
    for name in [*STATUS_UPDATES, *NOT_STATUS_UPDATES]:
        body = (DATA / "payloads" / name).read_bytes()
        response = await ingress.post(WEBHOOK_PATH, data=body, headers=signed(body, TEST_SECRET))
        assert response.status == 202, await response.text()
    await wait_drained(ingress)

    first = build(storage_env, CollectorRegistry())
    async with running_runner(first, kafka, f"timeline-{uuid.uuid4().hex[:8]}"):

        async def all_stored() -> bool:
            return await events_count(first) == len(STATUS_UPDATES)

        await eventually(all_stored, timeout=60)
        for name, (call, at, status, ended, error, caller) in STATUS_UPDATES.items():
            [stored] = await first.backend.timeline(call)
            assert (stored.event_time, stored.status) == (_utc(at), status), name
            assert (stored.ended_reason, stored.error, stored.from_number) == (
                ended,
                error,
                caller,
            )

    # The whole events topic read again by a new group: a replay from the beginning.
    registry = CollectorRegistry()
    again = build(storage_env, registry)
    async with running_runner(again, kafka, f"timeline-replay-{uuid.uuid4().hex[:8]}"):
        name = again.backend.name
        await eventually(
            lambda: (
                skipped(registry, name, "duplicate") == len(STATUS_UPDATES)
                and skipped(registry, name, "ignored") == len(NOT_STATUS_UPDATES)
            ),
            timeout=60,
        )
        assert await events_count(again) == len(STATUS_UPDATES)
