"""`callstream erase` and `callstream purge` against real SQLite and a real PostgreSQL.

Reports are stored the way the storage consumer stores them (the real sample, normalised,
Avro-encoded, through the backend's `write`); the erasure log is read back from the same
database; the CLI runs as a real process.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import itertools
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from prometheus_client import CollectorRegistry

from callstream.erase import erase, parse_age, purge
from callstream.localpg import PostgresServer
from consumers.contract import DecodedDelivery, Delivery
from consumers.storage import (
    StorageBackend,
    StorageConsumer,
    StorageSettings,
    erasure_log,
    open_backend,
    sha256_hex,
)
from core.secret import Secret
from schemas.codec import Decoder, single_object_encoder
from schemas.normalise import normalise
from schemas.report import CallReport
from schemas.store import END_OF_CALL_REPORT, default_store
from tests.support.cli import run_cli
from tests.support.samples import SAMPLE

ALICE = "+31600000101"
BOB = "+31600000202"
ENCODER = single_object_encoder(default_store().current(END_OF_CALL_REPORT))
DECODER = Decoder(default_store())
_OFFSETS = itertools.count()


def report(
    caller: str, *, age: timedelta = timedelta(hours=1), marker: str = "", call_id: str = ""
) -> Delivery:
    payload: dict[str, Any] = copy.deepcopy(orjson.loads(SAMPLE.read_bytes()))
    event_ms = int((datetime.now(UTC) - age).timestamp() * 1000)
    call_id = call_id or str(uuid.uuid4())
    payload |= {"callId": call_id, "fromCaller": caller, "eventTimestamp": event_ms}
    payload["transcriptText"] += marker
    normalised = normalise(payload, received_at_ms=event_ms + 500, request_id=uuid.uuid4().hex)
    assert normalised.record is not None
    value = ENCODER.encode(normalised.record)
    record = DECODER.decode_local(value).record
    CallReport.check_record(record)  # as the runner does
    topic = "flireo.end-of-call-report"
    return DecodedDelivery(None, topic, 0, next(_OFFSETS), value, record=record)


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> StorageSettings:
    if request.param == "sqlite":
        return StorageSettings(sqlite_path=tmp_path / "state" / "callstream.db")
    server: PostgresServer = request.getfixturevalue("postgres")
    dsn = server.create_database(f"erase_{uuid.uuid4().hex[:16]}")
    return StorageSettings(database_url=Secret(dsn))


@pytest.fixture
async def backend(settings: StorageSettings) -> AsyncIterator[StorageBackend]:
    """The storage consumer's own backend, left open (and idle) while erasures run."""
    async with open_backend(settings) as opened:
        yield opened


async def store(backend: StorageBackend, *deliveries: Delivery) -> list[str]:
    await backend.write(deliveries, stored_at=datetime.now(UTC))
    return [d.report.call_id for d in deliveries]


async def erasure_rows(settings: StorageSettings) -> list[tuple[Any, ...]]:
    """Every column of the erasure log, raw."""
    if settings.database_url is None:
        import sqlite3

        with sqlite3.connect(settings.sqlite_path) as db:
            return db.execute("SELECT * FROM erasures").fetchall()
    pg = await asyncpg.connect(settings.database_url.reveal())
    try:
        return [tuple(row) for row in await pg.fetch("SELECT * FROM erasures")]
    finally:
        await pg.close()


# -- erase ------------------------------------------------------------------------------------


async def test_erase_by_phone_deletes_that_callers_reports_and_logs_only_a_hash(
    settings: StorageSettings, backend: StorageBackend
) -> None:
    alice = await store(backend, report(ALICE), report(ALICE))
    [bob] = await store(backend, report(BOB))

    outcome = await erase(settings, phone=ALICE)

    assert outcome.rows == 2
    assert [await backend.fetch(call_id) for call_id in alice] == [None, None]
    assert await backend.fetch(bob) is not None
    [entry] = await erasure_log(settings).entries()
    assert entry.id == outcome.entry
    assert entry.kind == "phone"
    assert entry.phone_sha256 == hashlib.sha256(ALICE.encode()).hexdigest()
    assert entry.call_id_sha256 is None
    assert entry.rows_deleted == 2
    assert entry.completed_at is not None
    assert entry.requested_at <= entry.completed_at
    # The number itself appears nowhere in the log, in any column.
    for row in await erasure_rows(settings):
        assert ALICE not in repr(row)
        assert ALICE.lstrip("+") not in repr(row)


async def test_erase_by_call_id_deletes_that_call_only(
    settings: StorageSettings, backend: StorageBackend
) -> None:
    gone, kept = await store(backend, report(ALICE), report(ALICE))

    outcome = await erase(settings, call_id=gone)

    assert outcome.rows == 1
    assert await backend.fetch(gone) is None
    assert await backend.fetch(kept) is not None
    [entry] = await erasure_log(settings).entries()
    assert (entry.kind, entry.call_id_sha256, entry.phone_sha256) == (
        "call",
        sha256_hex(gone),
        None,
    )


async def test_erase_by_phone_and_call_needs_both_to_match(
    settings: StorageSettings, backend: StorageBackend
) -> None:
    [call] = await store(backend, report(ALICE))
    assert (await erase(settings, phone=BOB, call_id=call)).rows == 0
    assert (await erase(settings, phone=ALICE, call_id=call)).rows == 1
    entries = await erasure_log(settings).entries()
    assert [(e.kind, e.rows_deleted) for e in entries] == [("phone+call", 0), ("phone+call", 1)]


async def test_an_erasure_that_matches_nothing_is_recorded_too(
    settings: StorageSettings, backend: StorageBackend
) -> None:
    await store(backend, report(BOB))
    outcome = await erase(settings, phone=f"  {ALICE} ")
    assert outcome.rows == 0
    [entry] = await erasure_log(settings).entries()
    # Surrounding blanks (a paste from a spreadsheet) are not part of the number.
    assert entry.phone_sha256 == sha256_hex(ALICE)
    assert entry.rows_deleted == 0


@pytest.mark.parametrize(("phone", "call_id"), [(None, None), ("", None), (None, "  "), ("", "")])
async def test_erase_needs_a_selector(
    settings: StorageSettings, phone: str | None, call_id: str | None
) -> None:
    with pytest.raises(ValueError, match=r"--phone|--call"):
        await erase(settings, phone=phone, call_id=call_id)


async def test_storage_keeps_working_and_its_migrations_are_untouched(
    settings: StorageSettings, backend: StorageBackend
) -> None:
    before = await backend.applied_migrations()
    await store(backend, report(ALICE))
    await erase(settings, phone=ALICE)
    await erase(settings, phone=ALICE)  # the log table already exists: fine
    [call] = await store(backend, report(BOB))
    assert await backend.fetch(call) is not None
    assert await backend.applied_migrations() == before
    assert len(await erasure_log(settings).entries()) == 2


async def test_sqlite_erasure_leaves_no_trace_of_the_report_in_the_files(tmp_path: Path) -> None:
    """Deleted rows stay in SQLite's free pages and in the WAL until overwritten; the
    erasure compacts both, so the bytes are gone and not merely unlinked."""
    settings = StorageSettings(sqlite_path=tmp_path / "callstream.db")
    marker = f"ERASE-ME-{uuid.uuid4().hex}"
    async with open_backend(settings) as backend:
        await store(backend, report(ALICE, marker=marker), *[report(BOB) for _ in range(20)])

        def files() -> bytes:
            return b"".join(path.read_bytes() for path in tmp_path.iterdir() if path.is_file())

        assert marker.encode() in files()
        assert ALICE.encode() in files()
        outcome = await erase(settings, phone=ALICE)
        assert outcome.rows == 1
        assert outcome.compacted
        assert marker.encode() not in files()
        assert ALICE.encode() not in files()
        assert BOB.encode() in files()


# -- erasures outlive the copies on Kafka -------------------------------------------------------


async def test_an_erased_callers_reports_are_not_stored_again(
    settings: StorageSettings, backend: StorageBackend
) -> None:
    """A replay (or a late copy) of an erased caller's reports after the erasure: the
    storage consumer leaves them out and counts them, and keeps storing everyone else's."""
    first, second, bobs = report(ALICE), report(ALICE), report(BOB)
    await store(backend, first, second, bobs)
    assert (await erase(settings, phone=ALICE)).rows == 2

    registry = CollectorRegistry()
    consumer = StorageConsumer(backend, registry)
    later, bobs_next = report(ALICE), report(BOB)
    await consumer.handle([first, second, bobs, later, bobs_next])

    for delivery in (first, second, later):
        assert await backend.fetch(delivery.report.call_id) is None
    assert await backend.fetch(bobs_next.report.call_id) is not None
    labels: dict[str, str] = {"backend": backend.name}
    sample = registry.get_sample_value
    assert sample("callstream_storage_erased_skipped_total", labels) == 3
    assert sample("callstream_storage_rows_written_total", labels) == 1
    assert sample("callstream_storage_duplicates_total", labels) == 1  # Bob's first, again


async def test_an_erased_call_and_an_erased_call_of_a_caller_stay_erased(
    settings: StorageSettings, backend: StorageBackend
) -> None:
    by_call, by_both, alices_other, bobs = report(ALICE), report(ALICE), report(ALICE), report(BOB)
    await store(backend, by_call, by_both, alices_other, bobs)
    assert (await erase(settings, call_id=by_call.report.call_id)).rows == 1
    assert (await erase(settings, phone=ALICE, call_id=by_both.report.call_id)).rows == 1
    # Bob claiming the second call's id does not match "Alice's call with that id".
    assert (await erase(settings, phone=BOB, call_id=alices_other.report.call_id)).rows == 0

    written = await backend.write([by_call, by_both, alices_other, bobs], datetime.now(UTC))

    assert written.erased == 2
    assert await backend.fetch(by_call.report.call_id) is None
    assert await backend.fetch(by_both.report.call_id) is None
    assert await backend.fetch(alices_other.report.call_id) is not None
    assert await backend.fetch(bobs.report.call_id) is not None


@pytest.mark.parametrize("by", ["call", "phone"])
async def test_a_call_with_a_nul_erased_as_it_is_stored_is_not_stored_again(
    settings: StorageSettings, backend: StorageBackend, by: str
) -> None:
    """PostgreSQL cannot hold U+0000 and stores U+FFFD in its place; SQLite keeps it. An
    erasure names the call as the database shows it, and a copy arriving later is left out."""
    caller, call_id = "+3160000\x000303", f"{uuid.uuid4()}\x00tail"
    odd = report(caller, call_id=call_id)
    await store(backend, odd)
    nul_as = "\x00" if backend.name == "sqlite" else "\ufffd"
    shown = (call_id if by == "call" else caller).replace("\x00", nul_as)
    selector = {"call_id": shown} if by == "call" else {"phone": shown}

    assert (await erase(settings, **selector)).rows == 1
    written = await backend.write([odd], datetime.now(UTC))

    assert written.erased == 1
    assert await backend.fetch(call_id) is None


async def test_a_retention_purge_does_not_refuse_old_reports_that_come_back(
    settings: StorageSettings, backend: StorageBackend
) -> None:
    # Retention is rolling: the next scheduled purge removes them (docs/privacy.md).
    old = report(ALICE, age=timedelta(days=40))
    await store(backend, old)
    assert (await purge(settings, timedelta(days=30))).rows == 1
    assert (await backend.write([old], datetime.now(UTC))).erased == 0
    assert await backend.fetch(old.report.call_id) is not None


async def test_a_postgres_write_waits_for_an_erasure_in_progress(
    postgres: PostgresServer,
) -> None:
    """The race the fence closes: a write that read the log before the erasure's entry
    must not commit after the erasure's DELETE ran."""
    settings = StorageSettings(
        database_url=Secret(postgres.create_database(f"fence_{uuid.uuid4().hex[:16]}"))
    )
    late_copy = report(ALICE)
    async with open_backend(settings) as writer, open_backend(settings) as eraser:
        await writer.write([late_copy], datetime.now(UTC))
        log = erasure_log(settings)
        async with log.fenced():
            writing = asyncio.create_task(writer.write([late_copy], datetime.now(UTC)))
            await asyncio.sleep(1.0)
            assert not writing.done(), "the write did not wait for the erasure"
            entry = await log.begin("phone", phone_sha256=sha256_hex(ALICE))
            assert await eraser.erase(ALICE, None) == 1
        written = await asyncio.wait_for(writing, 30)
        await log.complete(entry, 1)
        assert written.erased == 1
        assert await writer.fetch(late_copy.report.call_id) is None


# -- purge ------------------------------------------------------------------------------------


async def test_purge_deletes_reports_older_than_the_age_and_logs_it(
    settings: StorageSettings, backend: StorageBackend
) -> None:
    old = await store(
        backend, report(ALICE, age=timedelta(days=40)), report(BOB, age=timedelta(days=31))
    )
    [recent] = await store(backend, report(ALICE, age=timedelta(days=29)))

    outcome = await purge(settings, timedelta(days=30))

    assert outcome.rows == 2
    assert [await backend.fetch(call_id) for call_id in old] == [None, None]
    assert await backend.fetch(recent) is not None
    [entry] = await erasure_log(settings).entries()
    assert (entry.kind, entry.older_than_seconds, entry.rows_deleted) == (
        "retention",
        30 * 86400,
        2,
    )
    assert (entry.phone_sha256, entry.call_id_sha256) == (None, None)


@pytest.mark.parametrize(
    ("text", "age"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("90m", timedelta(minutes=90)),
        ("3600s", timedelta(hours=1)),
        ("2w", timedelta(weeks=2)),
        (" 7 d ", timedelta(days=7)),
    ],
)
def test_ages(text: str, age: timedelta) -> None:
    assert parse_age(text) == age


@pytest.mark.parametrize("text", ["0d", "30", "d", "-1d", "1.5d", "30 days", "1y", ""])
def test_bad_ages_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="age"):
        parse_age(text)


# -- the command line -----------------------------------------------------------------------


def cli(settings: StorageSettings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLSTREAM_")}
    if settings.database_url is not None:
        env["CALLSTREAM_DATABASE_URL"] = settings.database_url.reveal()
    else:
        env["CALLSTREAM_SQLITE_PATH"] = str(settings.sqlite_path)
    env["CALLSTREAM_TOPIC"] = "flireo.test-erase"
    return run_cli(*args, env=env)


async def test_erase_and_purge_commands(settings: StorageSettings, backend: StorageBackend) -> None:
    [alice] = await store(backend, report(ALICE))
    [old] = await store(backend, report(BOB, age=timedelta(days=400)))

    erased = cli(settings, "erase", "--phone", ALICE)
    assert erased.returncode == 0, erased.stderr
    assert erased.stdout.startswith(
        "erased 1 stored row(s), reports and status updates (phone sha256 "
    )
    assert "flireo.test-erase and flireo.test-erase.dlq" in erased.stderr
    assert "retention" in erased.stderr
    # Neither the output nor the (JSON, masked) log repeats the number.
    assert ALICE not in erased.stdout + erased.stderr
    assert await backend.fetch(alice) is None

    purged = cli(settings, "purge", "--older-than", "365d")
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.startswith(
        "purged 1 stored row(s), reports and status updates, older than 365d"
    )
    assert await backend.fetch(old) is None
    kinds = [entry.kind for entry in await erasure_log(settings).entries()]
    assert kinds == ["phone", "retention"]


@pytest.mark.parametrize(
    "args", [("erase",), ("erase", "--phone", " "), ("purge", "--older-than", "0d")]
)
def test_commands_refuse_to_guess(tmp_path: Path, args: tuple[str, ...]) -> None:
    settings = StorageSettings(sqlite_path=tmp_path / "callstream.db")
    result = cli(settings, *args)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"callstream {args[0]}: ")
    # Refused before touching the database.
    assert not settings.sqlite_path.exists()
