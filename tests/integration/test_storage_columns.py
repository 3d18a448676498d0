"""Queryable columns: success_evaluation as plain text with its typed twin `success`, on
SQLite and PostgreSQL, and the migration that converts rows written as JSON text."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Mapping
from contextlib import closing
from typing import Any

import asyncpg
import orjson
import pytest

from consumers.storage import StorageConsumer
from consumers.storage.migrations import MIGRATIONS
from consumers.storage.rows import evaluation_text, success_flag
from consumers.storage.settings import BackendName
from tests.integration.test_storage import deliver, flat
from tests.support.storage import raw_row, running


async def test_where_success_evaluation_is_true_finds_the_samples_call(
    consumer: StorageConsumer, storage_env: dict[str, str]
) -> None:
    delivery = deliver(flat())  # the sample's successEvaluation: the string "true"
    await consumer.handle([delivery])

    found = await raw_row(
        storage_env,
        "SELECT call_id FROM call_reports WHERE success_evaluation = 'true'",
        "SELECT call_id FROM call_reports WHERE success_evaluation = 'true'",
    )
    assert found == (delivery.report.call_id,)


@pytest.mark.parametrize(
    ("evaluation", "text", "success"),
    [
        ("true", "true", True),
        ("false", "false", False),
        (" True\n", " True\n", True),
        ("FALSE", "FALSE", False),
        (True, "true", True),
        (False, "false", False),
        (7, "7", None),
        (0.5, "0.5", None),
        ("8", "8", None),
        ("Good", "Good", None),
        ("truely", "truely", None),
    ],
)
async def test_success_evaluation_is_plain_text_with_a_boolean_twin(
    consumer: StorageConsumer,
    storage_env: dict[str, str],
    evaluation: Any,
    text: str,
    success: bool | None,
) -> None:
    delivery = deliver(flat(evaluation=evaluation))
    await consumer.handle([delivery])

    row = await raw_row(
        storage_env,
        "SELECT success_evaluation, success, typeof(success_evaluation) FROM call_reports",
        "SELECT success_evaluation, success, pg_typeof(success_evaluation)::text FROM call_reports",
    )
    assert row[0] == text
    assert row[1] == (None if success is None else int(success))
    assert row[2] == "text"
    stored = await consumer.backend.fetch(delivery.report.call_id)
    assert stored is not None
    assert (stored.success_evaluation, stored.success) == (text, success)
    # The record keeps the type as it was sent.
    assert delivery.report.success_evaluation == evaluation


async def test_a_report_without_evaluation_has_neither_column(
    consumer: StorageConsumer, storage_env: dict[str, str]
) -> None:
    payload = flat()
    del payload["analysis"]["successEvaluation"]
    await consumer.handle([deliver(payload)])

    row = await raw_row(
        storage_env,
        "SELECT success_evaluation, success FROM call_reports",
        "SELECT success_evaluation, success FROM call_reports",
    )
    assert row == (None, None)


# -- the migration from JSON text -----------------------------------------------------------

# success_evaluation as migration 1 kept it (JSON text) -> (plain text, success) after 3.
OLD_ROWS: dict[str, tuple[str | None, str | None, bool | None]] = {
    "quoted-true": ('"true"', "true", True),
    "quoted-false": ('"False"', "False", False),
    "boolean-true": ("true", "true", True),
    "boolean-false": ("false", "false", False),
    "integer": ("7", "7", None),
    "real": ("0.5", "0.5", None),
    "word": ('"Good"', "Good", None),
    "numeric-string": ('"8"', "8", None),
    "quote-inside": ('"say \\"yes\\""', 'say "yes"', None),
    "spaced": ('" TRUE\\t\\n"', " TRUE\t\n", True),
    "fullwidth": ('"\uff34\uff32\uff35\uff25"', "\uff34\uff32\uff35\uff25", None),
    "no-break-space": ('"\u00a0true"', "\u00a0true", None),
    "score": ("8.5", "8.5", None),
    "none": (None, None, None),
}
_OLD_INSERT = (
    "INSERT INTO call_reports (call_id, event_type, event_time, received_at, source_format,"
    " request_id, record, kafka_partition, kafka_offset, stored_at, success_evaluation)"
    " VALUES ({}, 'end-of-call-report', {}, {}, 'FLAT', 'req', {}, 0, 0, {}, {})"
)


async def insert_old_rows(env: Mapping[str, str]) -> None:
    url = env.get("CALLSTREAM_DATABASE_URL")
    if url is None:
        when = "'2025-08-27T11:40:20.944000Z'"
        sql = _OLD_INSERT.format("?", when, when, "x'00'", when, "?")
        with closing(sqlite3.connect(env["CALLSTREAM_SQLITE_PATH"])) as lite, lite:
            lite.executemany(sql, [(call, old) for call, (old, _, _) in OLD_ROWS.items()])
        return
    when = "'2025-08-27T11:40:20.944Z'"
    sql = _OLD_INSERT.format("$1", when, when, "'\\x00'::bytea", when, "$2::jsonb")
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.executemany(sql, [(call, old) for call, (old, _, _) in OLD_ROWS.items()])
    finally:
        await conn.close()


async def test_migration_turns_json_text_into_plain_text_and_fills_success(
    storage_env: dict[str, str], backend_name: BackendName, monkeypatch: pytest.MonkeyPatch
) -> None:
    known = MIGRATIONS[backend_name]
    with monkeypatch.context() as before:
        # The database as the release before this one left it: migrations 1 and 2.
        before.setitem(MIGRATIONS, backend_name, known[:2])
        async with running(storage_env) as old:
            assert await old.backend.applied_migrations() == [1, 2]
    await insert_old_rows(storage_env)

    async with running(storage_env) as migrated:
        assert await migrated.backend.applied_migrations() == [m.version for m in known]
        for call, (_, text, success) in OLD_ROWS.items():
            row = await raw_row(
                storage_env,
                "SELECT success_evaluation, success FROM call_reports WHERE call_id = ?",
                "SELECT success_evaluation, success FROM call_reports WHERE call_id = $1",
                call,
            )
            assert row == (text, None if success is None else int(success)), call
            # What a new row would hold for the same value.
            if text is not None:
                sent = orjson.loads(OLD_ROWS[call][0] or "null")
                assert (evaluation_text(sent), success_flag(sent)) == (text, success), call
        # New rows go in beside the converted ones.
        await migrated.handle([deliver(flat(str(uuid.uuid4())))])
        (trues,) = await raw_row(
            storage_env,
            "SELECT count(*) FROM call_reports WHERE success_evaluation = 'true' AND success",
            "SELECT count(*) FROM call_reports WHERE success_evaluation = 'true' AND success",
        )
        assert trues == 3  # "true", true and the new one
