"""Storage builds a row straight from the decoded Avro record (the runner's deliveries)
exactly as it builds it from the report: same columns, same values, for every payload
format, for records older writers left on the topic, and for JSON that PostgreSQL cannot
hold as sent."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import fastavro
import orjson
import pytest

from consumers.contract import DecodedDelivery, Delivery
from consumers.storage.dialects import POSTGRES, SQLITE, Dialect
from consumers.storage.rows import newest_per_call
from schemas.codec import SINGLE_OBJECT_MAGIC, Decoder, single_object_encoder
from schemas.normalise import normalise
from schemas.report import CallReport
from schemas.store import END_OF_CALL_REPORT, default_store
from tests.support.paths import DATA

STORE = default_store()
ENCODER = single_object_encoder(STORE.current(END_OF_CALL_REPORT))
DECODER = Decoder(STORE)
V2_RECORDS: dict[str, dict[str, Any]] = orjson.loads((DATA / "v2-records.json").read_bytes())
PAYLOADS = sorted([*DATA.glob("nested-*.json"), *(DATA / "payloads").glob("*end-of-call*.json")])


def _end_of_call(path: Path) -> bytes:
    """The record the ingress puts on the topic for `path`."""
    normalised = normalise(orjson.loads(path.read_bytes()), received_at_ms=1, request_id="r-1")
    assert normalised.record is not None
    return ENCODER.encode(normalised.record)


def _v2(name: str) -> bytes:
    v2 = STORE.versions(END_OF_CALL_REPORT)[1]
    body = io.BytesIO()
    fastavro.schemaless_writer(body, v2.parsed, V2_RECORDS[name])
    return SINGLE_OBJECT_MAGIC + v2.fingerprint + body.getvalue()


RECORDS = {
    **{p.name: _end_of_call(p) for p in PAYLOADS},
    **{f"v2 {name}": _v2(name) for name in V2_RECORDS},
}


def _both(value: bytes) -> tuple[Delivery, DecodedDelivery]:
    record = DECODER.decode_local(value).record
    CallReport.check_record(record)
    by_report = Delivery(CallReport.from_record(record), "t", 3, 7, value)
    return by_report, DecodedDelivery(None, "t", 3, 7, value, record=record)


@pytest.mark.parametrize("dialect", [SQLITE, POSTGRES], ids=lambda d: d.name)
@pytest.mark.parametrize("name", sorted(RECORDS))
def test_a_row_from_the_record_is_the_row_from_the_report(dialect: Dialect, name: str) -> None:
    by_report, by_record = _both(RECORDS[name])

    assert dialect.rows([by_record]) == dialect.rows([by_report])


def test_the_report_of_a_decoded_delivery_is_built_from_its_record() -> None:
    by_report, by_record = _both(RECORDS["flireo-flat-end-of-call.json"])

    assert by_record.report == by_report.report


def test_a_copy_with_another_report_stores_that_report_not_the_record() -> None:
    _, by_record = _both(RECORDS["flireo-flat-end-of-call.json"])
    changed = dataclasses.replace(
        by_record, report=dataclasses.replace(by_record.report, summary="changed")
    )

    (row,) = SQLITE.rows([changed])

    assert "changed" in row
    assert by_record.record is not None
    assert by_record.record["summary"] != "changed"


def test_json_with_a_nul_reaches_postgresql_as_the_report_path_writes_it() -> None:
    payload = orjson.loads((DATA / "payloads" / "flireo-flat-end-of-call.json").read_bytes())
    payload["analysis"]["structuredData"] = {"note\x00key": "a\x00b", "list": ["\x00"]}
    normalised = normalise(payload, received_at_ms=1, request_id="r-1")
    assert normalised.record is not None
    by_report, by_record = _both(ENCODER.encode(normalised.record))

    (row,) = POSTGRES.rows([by_record])

    assert row == POSTGRES.rows([by_report])[0]
    assert "\\u0000" not in "".join(v for v in row if isinstance(v, str))


def test_the_newest_version_of_a_call_wins_whichever_way_its_rows_are_built() -> None:
    payload = orjson.loads((DATA / "payloads" / "flireo-flat-end-of-call.json").read_bytes())
    deliveries: list[Delivery] = []
    for received, build in ((1, 0), (3, 1), (2, 0)):
        normalised = normalise(payload, received_at_ms=received, request_id=f"r-{received}")
        assert normalised.record is not None
        deliveries.append(_both(ENCODER.encode(normalised.record))[build])

    (newest,) = newest_per_call(deliveries, SQLITE.text)

    assert newest is deliveries[1]
