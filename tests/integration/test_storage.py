"""The `storage` consumer against real databases: a SQLite file and a PostgreSQL server.

Every behaviour runs on both backends unless it is about one of them. Reports are built the
way the runner sees them: the real sample through the normaliser, an Avro round trip on the
current schema, then `CallReport.from_record`. PostgreSQL is the session's one server (the
`postgres` fixture in conftest.py) with a fresh database per test; a missing server fails.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import random
import sqlite3
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from callstream.localpg import PostgresServer
from consumers.contract import DecodedDelivery, Delivery
from consumers.errors import PermanentError, RetryableError
from consumers.storage import (
    DEFAULT_SQLITE_PATH,
    POSTGRES_MIGRATIONS,
    SQLITE_MIGRATIONS,
    StorageConsumer,
    StorageSettings,
    build,
    classify_postgres,
    open_backend,
)
from consumers.storage.connections import SqliteConnection
from core.settings import SettingsError
from schemas.codec import Decoder, single_object_encoder
from schemas.normalise import normalise
from schemas.report import CallReport
from schemas.store import END_OF_CALL_REPORT, default_store
from tests.support.paths import DATA, REPO
from tests.support.runner import eventually
from tests.support.storage import fresh_database, raw_row, running

SAMPLE: dict[str, Any] = orjson.loads(
    (REPO.parent / "shared" / "samples" / "end-of-call-report.json").read_bytes()
)
NESTED: dict[str, Any] = orjson.loads((REPO / "tests" / "data" / "nested-camel.json").read_bytes())
SAMPLE_CALLER = "+31623731537"
SAMPLE_EVENT_MS = 1_756_294_820_944  # eventTimestamp in the sample
TOPIC = "flireo.end-of-call-report"

ENCODER = single_object_encoder(default_store().current(END_OF_CALL_REPORT))
DECODER = Decoder(default_store())
_OFFSETS = itertools.count()


# -- building deliveries -------------------------------------------------------------------


def flat(
    call_id: str | None = None,
    *,
    event_ms: int = SAMPLE_EVENT_MS,
    evaluation: Any = "true",
    structured: Mapping[str, Any] | None = None,
    **top: Any,
) -> dict[str, Any]:
    """The sample with a call id, event time and the given changes."""
    payload = copy.deepcopy(SAMPLE)
    payload["callId"] = call_id or str(uuid.uuid4())
    payload["eventTimestamp"] = event_ms
    payload["analysis"]["successEvaluation"] = evaluation
    payload["analysis"]["structuredData"].update(structured or {})
    payload.update(top)
    return payload


def deliver(
    payload: dict[str, Any], *, received_ms: int = SAMPLE_EVENT_MS + 500, partition: int = 0
) -> Delivery:
    normalised = normalise(payload, received_at_ms=received_ms, request_id=str(uuid.uuid4()))
    assert normalised.record is not None
    value = ENCODER.encode(normalised.record)
    # As the runner hands it out: the decoded record, checked, the report built on demand.
    record = DECODER.decode_local(value).record
    CallReport.check_record(record)
    return DecodedDelivery(None, TOPIC, partition, next(_OFFSETS), value, record=record)


def decoded(record: bytes) -> CallReport:
    return CallReport.from_record(DECODER.decode_local(record).record)


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def postgres_restarted(postgres: PostgresServer) -> Iterator[PostgresServer]:
    """The session server, for tests that stop it: always running again afterwards."""
    try:
        yield postgres
    finally:
        if not postgres.running:
            postgres.start()


def metric(registry: CollectorRegistry, name: str, backend: str) -> float:
    value = registry.get_sample_value(name, {"backend": backend})
    assert value is not None, f"{name} is not exposed"
    return value


# -- settings ------------------------------------------------------------------------------


def test_settings_default_to_a_local_sqlite_file() -> None:
    settings = StorageSettings.from_env({})
    assert settings == StorageSettings(sqlite_path=DEFAULT_SQLITE_PATH, database_url=None)
    assert settings.backend == "sqlite"
    assert str(DEFAULT_SQLITE_PATH) == ".callstream/callstream.db"


def test_settings_choose_postgresql_when_a_database_url_is_set() -> None:
    url = "postgresql://cs:hunter2@db:5432/callstream"
    settings = StorageSettings.from_env(
        {"CALLSTREAM_DATABASE_URL": url, "CALLSTREAM_SQLITE_PATH": "/x/y.db"}
    )
    assert settings.backend == "postgresql"
    assert settings.database_url is not None
    assert settings.database_url.reveal() == url
    assert "hunter2" not in repr(settings)


def test_settings_refuse_a_database_url_that_is_not_postgresql() -> None:
    with pytest.raises(SettingsError, match="CALLSTREAM_DATABASE_URL") as info:
        StorageSettings.from_env({"CALLSTREAM_DATABASE_URL": "mysql://u:secret@h/db"})
    assert "secret" not in str(info.value)


async def test_default_sqlite_path_is_created_with_its_parent_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with running({}) as consumer:
        await consumer.handle([deliver(flat())])
    assert (tmp_path / ".callstream" / "callstream.db").is_file()


# -- what a row holds ----------------------------------------------------------------------


async def test_columns_hold_the_reports_values_with_their_types(
    consumer: StorageConsumer, storage_env: dict[str, str], backend_name: str
) -> None:
    structured = {"details": {"dagen": ["ma", "di"], "score": 7.5, "leeg": None}, "n": [1, [2]]}
    delivery = deliver(flat(structured=structured), partition=3)
    await consumer.handle([delivery])

    stored = await consumer.backend.fetch(delivery.report.call_id)
    report = delivery.report
    assert stored is not None
    assert stored.call_id == report.call_id
    assert stored.event_time == datetime(2025, 8, 27, 11, 40, 20, 944000, tzinfo=UTC)
    assert stored.received_at == report.received_at
    assert stored.from_number == SAMPLE_CALLER
    assert stored.duration_seconds == 132.5
    assert stored.transcript == report.transcript
    assert stored.analysis_summary == report.analysis_summary
    assert stored.structured_data == report.structured_data
    assert stored.structured_data is not None
    assert stored.structured_data["details"] == structured["details"]
    assert stored.user_metadata == {"candidateId": "cand_123456", "preferredRole": "backend"}
    assert stored.source_format == "FLAT"
    assert stored.request_id == report.request_id
    assert stored.record == delivery.value
    assert (stored.kafka_partition, stored.kafka_offset) == (3, delivery.offset)
    assert stored.stored_at.tzinfo is not None

    row = await raw_row(
        storage_env,
        "SELECT event_time, typeof(duration_seconds), typeof(record),"
        " json_extract(structured_data, '$.details.dagen[1]'),"
        " json_type(structured_data, '$.details.leeg') FROM call_reports",
        "SELECT pg_typeof(event_time)::text, pg_typeof(duration_seconds)::text,"
        " pg_typeof(record)::text, structured_data #>> '{details,dagen,1}',"
        " jsonb_typeof(structured_data #> '{details,leeg}') FROM call_reports",
    )
    if backend_name == "sqlite":
        assert row == ("2025-08-27T11:40:20.944000Z", "real", "blob", "di", "null")
    else:
        assert row == ("timestamp with time zone", "double precision", "bytea", "di", "null")


async def test_nested_report_fills_the_columns_only_it_has(consumer: StorageConsumer) -> None:
    delivery = deliver(copy.deepcopy(NESTED))
    await consumer.handle([delivery])

    stored = await consumer.backend.fetch("5c4d030f-8f7b-4e0c-9a51-2f3b1f6e9d11")
    assert stored is not None
    assert (stored.call_type, stored.call_status) == ("inboundPhoneCall", "ended")
    assert (stored.assistant_name, stored.ended_reason) == ("Flireo Demo", "customer-ended-call")
    assert (stored.from_number, stored.to_number) == ("+31612345678", "+31850835037")
    assert stored.duration_seconds == 84.0
    assert isinstance(stored.duration_seconds, float)
    assert stored.success_evaluation is None
    assert stored.source_format == "NESTED_CAMEL"
    assert stored.extra == delivery.report.extra
    assert stored.extra is not None
    assert "futureField" in orjson.dumps(stored.extra).decode()


async def test_a_vapi_report_fills_the_columns_of_schema_v3(consumer: StorageConsumer) -> None:
    """Start and end times, cost, the agent and the transcript as turns, each in a column
    of its own type, in both databases."""
    payload = orjson.loads((DATA / "payloads" / "vapi-end-of-call.json").read_bytes())
    await consumer.handle([deliver(payload)])

    stored = await consumer.backend.fetch("b7c8d9e0-f1a2-4b3c-9d4e-5f6a7b8c9d0e")
    assert stored is not None
    assert stored.started_at == datetime(2026, 1, 7, 8, 0, 0, tzinfo=UTC)
    assert stored.ended_at == datetime(2026, 1, 7, 8, 0, 23, tzinfo=UTC)
    assert (stored.cost, stored.agent_name) == (0.0405, "Mila")
    assert stored.agent_id == "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
    assert stored.ended_reason == "assistant-ended-call"
    assert stored.event_time_source == "sent"
    assert stored.transcript_turns is not None
    assert len(stored.transcript_turns) == 5
    assert {turn["role"] for turn in stored.transcript_turns} <= {"user", "assistant"}


async def test_sqlite_keeps_nul_characters_as_they_are(tmp_path: Path) -> None:
    env = {"CALLSTREAM_SQLITE_PATH": str(tmp_path / "nul.db")}
    delivery = deliver(flat(transcriptText="AI: hallo\x00daar", structured={"k\x00": "v\x00"}))
    async with running(env) as consumer:
        await consumer.handle([delivery])
        stored = await consumer.backend.fetch(delivery.report.call_id)
    assert stored is not None
    assert stored.transcript == "AI: hallo\x00daar"
    assert stored.structured_data is not None
    assert stored.structured_data["k\x00"] == "v\x00"
    assert stored.record == delivery.value


async def test_sqlite_copies_a_batch_into_the_database_file_beside_the_writer(
    tmp_path: Path,
) -> None:
    """What a batch wrote to the WAL reaches the database file soon after, long before the
    writer's own checkpoint at 32 MB would copy it inside a later batch's COMMIT."""
    path = tmp_path / "checkpointed.db"
    async with running({"CALLSTREAM_SQLITE_PATH": str(path)}) as consumer:
        await consumer.handle([deliver(flat())])
        await eventually(lambda: path.with_name(path.name + "-wal").exists())
        before = path.stat().st_size
        batch = [deliver(flat()) for _ in range(200)]
        await consumer.handle(batch)
        wal = path.with_name(path.name + "-wal").stat().st_size
        assert wal < 32 * 1024 * 1024
        # 200 rows of several kB each: far more than a page or two of the schema.
        await eventually(lambda: path.stat().st_size > before + 200 * 2_000, timeout=10)
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM call_reports").fetchone()[0] == 201


async def test_a_batch_committed_while_a_checkpoint_runs_is_copied_by_another_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The background checkpoint is still finishing when the next batch commits: that batch
    must not wait in the WAL for a write that may never come."""
    path = tmp_path / "checkpointed.db"
    async with running({"CALLSTREAM_SQLITE_PATH": str(path)}) as consumer:
        connection = consumer.backend.connection
        assert isinstance(connection, SqliteConnection)
        background = connection._checkpointer._db
        checkpointed, finish = asyncio.Event(), asyncio.Event()
        real_run = background.run

        async def run_then_linger(work: Any) -> Any:
            # The first checkpoint copies the WAL, then lingers as a slow one would.
            result = await real_run(work)
            if not checkpointed.is_set():
                checkpointed.set()
                await finish.wait()
            return result

        monkeypatch.setattr(background, "run", run_then_linger)
        await consumer.handle([deliver(flat())])
        await checkpointed.wait()
        before = path.stat().st_size
        await consumer.handle([deliver(flat()) for _ in range(200)])
        finish.set()

        await eventually(lambda: path.stat().st_size > before + 200 * 2_000, timeout=10)


async def test_postgres_stores_nul_with_sanitised_columns_and_the_exact_record(
    postgres: PostgresServer,
) -> None:
    env = {"CALLSTREAM_DATABASE_URL": fresh_database(postgres)}
    delivery = deliver(
        flat(
            transcriptText="AI: hallo\x00daar",
            summaryText="\x00",
            structured={"k\x00": ["v\x00", {"x": "\x00"}]},
        )
    )
    async with running(env) as consumer:
        await consumer.handle([delivery])
        stored = await consumer.backend.fetch(delivery.report.call_id)
    assert stored is not None
    assert stored.transcript == "AI: hallo\ufffddaar"
    assert stored.summary == "\ufffd"
    assert stored.structured_data is not None
    assert stored.structured_data["k\ufffd"] == ["v\ufffd", {"x": "\ufffd"}]
    # The record is the report exactly as published, NUL characters included.
    assert stored.record == delivery.value
    assert decoded(stored.record).transcript == "AI: hallo\x00daar"


# -- upsert semantics ----------------------------------------------------------------------


async def test_the_same_report_twice_leaves_one_unchanged_row(
    consumer: StorageConsumer, registry: CollectorRegistry, backend_name: str
) -> None:
    delivery = deliver(flat())
    await consumer.handle([delivery])
    first = await consumer.backend.fetch(delivery.report.call_id)

    # A redelivery, then a replay of the same record from another offset.
    await consumer.handle([delivery])
    await consumer.handle([dataclasses.replace(delivery, partition=5, offset=10_000)])

    assert await consumer.backend.count() == 1
    assert await consumer.backend.fetch(delivery.report.call_id) == first
    assert metric(registry, "callstream_storage_rows_written_total", backend_name) == 1
    assert metric(registry, "callstream_storage_duplicates_total", backend_name) == 2


async def test_a_later_event_time_replaces_the_stored_report(consumer: StorageConsumer) -> None:
    call_id = str(uuid.uuid4())
    old = deliver(flat(call_id, transcriptText="eerste"))
    new = deliver(flat(call_id, event_ms=SAMPLE_EVENT_MS + 1, transcriptText="tweede"))
    await consumer.handle([old])
    await consumer.handle([new])

    stored = await consumer.backend.fetch(call_id)
    assert stored is not None
    assert stored.transcript == "tweede"
    assert stored.record == new.value
    assert stored.kafka_offset == new.offset
    assert await consumer.backend.count() == 1


async def test_on_equal_event_time_the_later_received_report_wins(
    consumer: StorageConsumer,
) -> None:
    call_id = str(uuid.uuid4())
    first = deliver(flat(call_id, transcriptText="eerste"), received_ms=SAMPLE_EVENT_MS + 10)
    second = deliver(flat(call_id, transcriptText="tweede"), received_ms=SAMPLE_EVENT_MS + 11)
    await consumer.handle([first])
    await consumer.handle([second])
    # ...and an older receipt of the same event arriving late changes nothing.
    await consumer.handle([first])

    stored = await consumer.backend.fetch(call_id)
    assert stored is not None
    assert stored.transcript == "tweede"
    assert stored.record == second.value


async def test_an_older_report_never_overwrites_a_newer_one(
    consumer: StorageConsumer, registry: CollectorRegistry, backend_name: str
) -> None:
    call_id = str(uuid.uuid4())
    new = deliver(flat(call_id, event_ms=SAMPLE_EVENT_MS + 60_000, transcriptText="nieuw"))
    old = deliver(flat(call_id, transcriptText="oud"), received_ms=SAMPLE_EVENT_MS + 90_000)
    await consumer.handle([new])
    before = await consumer.backend.fetch(call_id)
    await consumer.handle([old])

    assert await consumer.backend.fetch(call_id) == before
    assert metric(registry, "callstream_storage_duplicates_total", backend_name) == 1


@pytest.mark.parametrize("seed", range(3))
async def test_several_versions_in_one_batch_keep_the_newest(
    consumer: StorageConsumer, registry: CollectorRegistry, backend_name: str, seed: int
) -> None:
    call_id = str(uuid.uuid4())
    versions = [
        deliver(flat(call_id, event_ms=SAMPLE_EVENT_MS + 5, transcriptText="v1")),
        deliver(flat(call_id, event_ms=SAMPLE_EVENT_MS + 9, transcriptText="v3")),
        deliver(flat(call_id, event_ms=SAMPLE_EVENT_MS + 7, transcriptText="v2")),
    ]
    newest = versions[1]
    other = deliver(flat())
    batch = [*versions, newest, other]
    random.Random(seed).shuffle(batch)
    await consumer.handle(batch)

    stored = await consumer.backend.fetch(call_id)
    assert stored is not None
    assert stored.transcript == "v3"
    assert stored.record == newest.value
    assert await consumer.backend.count() == 2
    assert metric(registry, "callstream_storage_rows_written_total", backend_name) == 2
    assert metric(registry, "callstream_storage_duplicates_total", backend_name) == 3


async def test_a_replayed_batch_writes_only_what_is_new_or_newer(
    consumer: StorageConsumer, registry: CollectorRegistry, backend_name: str
) -> None:
    # More calls than one of SQLite's lookups of stored versions takes.
    stored = [deliver(flat()) for _ in range(700)]
    await consumer.handle(stored)
    untouched = await consumer.backend.fetch(stored[0].report.call_id)
    changed = stored[1].report.call_id
    newer = deliver(flat(changed, event_ms=SAMPLE_EVENT_MS + 1, transcriptText="nieuw"))
    new = deliver(flat())

    await consumer.handle([*stored, newer, new])

    assert await consumer.backend.fetch(stored[0].report.call_id) == untouched
    refreshed = await consumer.backend.fetch(changed)
    assert refreshed is not None
    assert (refreshed.transcript, refreshed.record) == ("nieuw", newer.value)
    assert await consumer.backend.fetch(new.report.call_id) is not None
    assert await consumer.backend.count() == 701
    assert metric(registry, "callstream_storage_rows_written_total", backend_name) == 702
    assert metric(registry, "callstream_storage_duplicates_total", backend_name) == 700


async def test_overlapping_batches_from_two_instances_settle_on_the_newest(
    storage_env: dict[str, str],
) -> None:
    call_ids = [str(uuid.uuid4()) for _ in range(2000)]
    older = [deliver(flat(c, transcriptText="oud")) for c in call_ids]
    newer = [
        deliver(flat(c, event_ms=SAMPLE_EVENT_MS + 1, transcriptText="nieuw")) for c in call_ids
    ]
    async with running(storage_env) as one, running(storage_env) as two:
        for _ in range(3):
            # Opposite orders: without a fixed lock order this is how upserts deadlock.
            await asyncio.gather(
                one.handle([*older, *newer]), two.handle(list(reversed([*older, *newer])))
            )
        stored = [await one.backend.fetch(c) for c in call_ids]
    assert all(s is not None and s.transcript == "nieuw" for s in stored)


async def test_a_large_batch_is_written_whole(
    consumer: StorageConsumer, registry: CollectorRegistry, backend_name: str
) -> None:
    batch = [deliver(flat()) for _ in range(2500)]
    await consumer.handle(batch)
    assert await consumer.backend.count() == 2500
    assert metric(registry, "callstream_storage_rows_written_total", backend_name) == 2500
    assert (
        registry.get_sample_value(
            "callstream_storage_write_duration_seconds_count", {"backend": backend_name}
        )
        == 1
    )


async def test_metrics_live_on_the_injected_registry_only(
    consumer: StorageConsumer, registry: CollectorRegistry, backend_name: str
) -> None:
    await consumer.handle([deliver(flat())])
    assert metric(registry, "callstream_storage_rows_written_total", backend_name) == 1
    assert metric(registry, "callstream_storage_duplicates_total", backend_name) == 0
    assert metric(registry, "callstream_storage_write_duration_seconds_count", backend_name) == 1
    assert (
        REGISTRY.get_sample_value(
            "callstream_storage_rows_written_total", {"backend": backend_name}
        )
        is None
    )


# -- errors --------------------------------------------------------------------------------


async def test_content_the_database_refuses_is_permanent_and_writes_nothing(
    consumer: StorageConsumer,
) -> None:
    good = deliver(flat())
    bad = deliver(flat())
    # A lone surrogate: valid in a Python str, impossible in UTF-8 and so in any database.
    bad = dataclasses.replace(bad, report=dataclasses.replace(bad.report, transcript="\ud800"))
    with pytest.raises(PermanentError) as info:
        await consumer.handle([good, bad])
    assert "\ud800" not in str(info.value)
    assert await consumer.backend.count() == 0

    await consumer.handle([good])
    assert await consumer.backend.count() == 1


async def test_postgres_down_is_retryable_and_the_same_batch_succeeds_once_it_is_back(
    postgres_restarted: PostgresServer,
) -> None:
    env = {"CALLSTREAM_DATABASE_URL": fresh_database(postgres_restarted)}
    batch = [deliver(flat()) for _ in range(5)]
    async with running(env) as consumer:
        await consumer.handle([deliver(flat())])
        postgres_restarted.stop()
        with pytest.raises(RetryableError):
            await consumer.handle(batch)
        with pytest.raises(RetryableError):
            await consumer.backend.count()
        postgres_restarted.start()

        await consumer.handle(batch)
        assert await consumer.backend.count() == 6


async def test_start_with_postgres_down_defers_migrations_to_the_first_batch(
    postgres_restarted: PostgresServer,
) -> None:
    env = {"CALLSTREAM_DATABASE_URL": fresh_database(postgres_restarted)}
    postgres_restarted.stop()
    consumer = build(env, CollectorRegistry())
    try:
        await consumer.start()  # must not raise: a restart loop helps nobody
        with pytest.raises(RetryableError):
            await consumer.handle([deliver(flat())])
        postgres_restarted.start()
        await consumer.handle([deliver(flat())])
        assert await consumer.backend.applied_migrations() == [
            m.version for m in POSTGRES_MIGRATIONS
        ]
    finally:
        await consumer.stop()


async def test_too_many_connections_is_retryable(postgres: PostgresServer) -> None:
    dsn = fresh_database(postgres)
    role = f"limited_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(dsn, timeout=10)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 0")
    finally:
        await admin.close()
    env = {"CALLSTREAM_DATABASE_URL": dsn.replace("//postgres@", f"//{role}@")}
    async with running(env) as consumer:
        with pytest.raises(RetryableError, match="TooManyConnections"):
            await consumer.handle([deliver(flat())])


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (asyncpg.TooManyConnectionsError("too many connections"), RetryableError),
        (asyncpg.SerializationError("could not serialize access"), RetryableError),
        (asyncpg.DeadlockDetectedError("deadlock detected"), RetryableError),
        (asyncpg.AdminShutdownError("terminating connection"), RetryableError),
        (asyncpg.CannotConnectNowError("the database system is starting up"), RetryableError),
        (asyncpg.ReadOnlySQLTransactionError("read-only transaction"), RetryableError),
        (asyncpg.DiskFullError("could not extend file"), RetryableError),
        (ConnectionRefusedError(111, "Connection refused"), RetryableError),
        (TimeoutError(), RetryableError),
        (asyncpg.CharacterNotInRepertoireError("invalid byte sequence"), PermanentError),
        (asyncpg.UntranslatableCharacterError("unsupported Unicode escape"), PermanentError),
        (asyncpg.ProgramLimitExceededError("index row size exceeds maximum"), PermanentError),
        (asyncpg.CheckViolationError("violates check constraint"), PermanentError),
    ],
)
def test_postgres_errors_are_sorted_into_retryable_and_permanent(
    error: BaseException, expected: type[Exception]
) -> None:
    assert type(classify_postgres(error)) is expected


# -- migrations ----------------------------------------------------------------------------


async def test_migrations_are_recorded_once_and_rerun_harmlessly_on_restart(
    storage_env: dict[str, str],
) -> None:
    delivery = deliver(flat())
    async with running(storage_env) as consumer:
        await consumer.handle([delivery])
    async with running(storage_env) as consumer:
        versions = await consumer.backend.applied_migrations()
        assert await consumer.backend.count() == 1
        await consumer.handle([deliver(flat())])

    known = SQLITE_MIGRATIONS if "CALLSTREAM_SQLITE_PATH" in storage_env else POSTGRES_MIGRATIONS
    assert versions == [m.version for m in known]
    (rows,) = await raw_row(
        storage_env,
        "SELECT count(*) FROM callstream_schema_migrations",
        "SELECT count(*) FROM callstream_schema_migrations",
    )
    assert rows == len(known)


async def test_instances_starting_at_once_migrate_once(storage_env: dict[str, str]) -> None:
    consumers = [build(storage_env, CollectorRegistry()) for _ in range(4)]
    try:
        await asyncio.gather(*(c.start() for c in consumers))
        await asyncio.gather(*(c.handle([deliver(flat())]) for c in consumers))
        known = (
            SQLITE_MIGRATIONS if "CALLSTREAM_SQLITE_PATH" in storage_env else POSTGRES_MIGRATIONS
        )
        assert await consumers[0].backend.applied_migrations() == [m.version for m in known]
        assert await consumers[0].backend.count() == 4
    finally:
        await asyncio.gather(*(c.stop() for c in consumers))


async def test_sqlite_runs_in_wal_mode_with_full_synchronous_commits(tmp_path: Path) -> None:
    backend = open_backend(StorageSettings(sqlite_path=tmp_path / "durable.db"))
    async with backend:
        ((synchronous,),) = await backend._query("PRAGMA synchronous")
    assert synchronous == 2  # FULL
    with closing(sqlite3.connect(tmp_path / "durable.db")) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- erasure, retention, replay ------------------------------------------------------------


async def test_erase_by_phone_removes_every_call_from_that_caller_only(
    consumer: StorageConsumer,
) -> None:
    mine = [deliver(flat()) for _ in range(3)]
    theirs = deliver(flat(fromCaller="+31600000000"))
    # Someone calling *to* the erased number's owner keeps their call.
    inbound = deliver(flat(fromCaller="+31600000001", toAssistant=SAMPLE_CALLER))
    await consumer.handle([*mine, theirs, inbound])

    assert await consumer.backend.erase(SAMPLE_CALLER, None) == 3
    assert await consumer.backend.count() == 2
    assert await consumer.backend.fetch(theirs.report.call_id) is not None
    assert await consumer.backend.erase(SAMPLE_CALLER, None) == 0


async def test_erase_by_call_id_removes_that_call(consumer: StorageConsumer) -> None:
    gone, kept = deliver(flat()), deliver(flat())
    await consumer.handle([gone, kept])
    assert await consumer.backend.erase(None, gone.report.call_id) == 1
    assert await consumer.backend.fetch(gone.report.call_id) is None
    assert await consumer.backend.fetch(kept.report.call_id) is not None


async def test_erase_with_phone_and_call_id_needs_both_to_match(
    consumer: StorageConsumer,
) -> None:
    delivery = deliver(flat())
    await consumer.handle([delivery])
    assert await consumer.backend.erase("+31600000000", delivery.report.call_id) == 0
    assert await consumer.backend.erase(SAMPLE_CALLER, delivery.report.call_id) == 1
    with pytest.raises(ValueError, match="phone number, a call id"):
        await consumer.backend.erase(None, None)


async def test_purge_older_than_removes_calls_by_event_time(consumer: StorageConsumer) -> None:
    recent = deliver(flat(event_ms=ms(datetime.now(UTC) - timedelta(hours=1))))
    old = deliver(flat())  # the sample's call, in 2025
    await consumer.handle([recent, old])

    assert await consumer.backend.purge_older_than(timedelta(days=1)) == 1
    assert await consumer.backend.fetch(old.report.call_id) is None
    assert await consumer.backend.fetch(recent.report.call_id) is not None


@pytest.mark.parametrize("age", [timedelta(0), timedelta(days=-1)])
async def test_retention_refuses_an_age_that_would_delete_everything(
    consumer: StorageConsumer, age: timedelta
) -> None:
    await consumer.handle([deliver(flat())])
    with pytest.raises(ValueError, match="must be positive"):
        await consumer.backend.purge_older_than(age)
    assert await consumer.backend.count() == 1


async def test_iter_records_pages_through_a_window_in_event_time_order(
    consumer: StorageConsumer,
) -> None:
    # Three calls per millisecond, so pages also break inside runs of equal event times.
    batch = [deliver(flat(event_ms=SAMPLE_EVENT_MS + i // 3)) for i in range(2600)]
    await consumer.handle(batch)
    since = batch[0].report.event_time + timedelta(milliseconds=10)
    until = batch[0].report.event_time + timedelta(milliseconds=800)

    got = [item async for item in consumer.backend.iter_records(since, until)]

    expected = sorted(
        (d for d in batch if since <= d.report.event_time < until),
        key=lambda d: (d.report.event_time, d.report.call_id),
    )
    assert [call_id for call_id, _ in got] == [d.report.call_id for d in expected]
    assert [record for _, record in got] == [d.value for d in expected]
    everything = [c async for c, _ in consumer.backend.iter_records(batch[0].report.event_time)]
    assert len(everything) == 2600


async def test_records_from_storage_decode_to_the_stored_reports(
    consumer: StorageConsumer,
) -> None:
    batch: Sequence[Delivery] = [deliver(flat()), deliver(copy.deepcopy(NESTED))]
    await consumer.handle(batch)
    since = datetime(2000, 1, 1, tzinfo=UTC)
    replayed = {c: decoded(r) async for c, r in consumer.backend.iter_records(since)}
    assert replayed == {d.report.call_id: d.report for d in batch}
