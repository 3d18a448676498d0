"""The schema contract: evolution rules, reading across versions, fingerprints, codec errors."""

from __future__ import annotations

import copy
import io
import json
import shutil
from pathlib import Path
from typing import Any

import fastavro
import fastavro.schema
import orjson
import pytest

from schemas.codec import SINGLE_OBJECT_MAGIC, Decoder, single_object_encoder
from schemas.compat import check_compatible, check_evolution
from schemas.errors import DecodeError, SchemaError, UnknownSchemaError
from schemas.headers import RecordHeaders
from schemas.normalise import normalise
from schemas.report import CallReport
from schemas.store import AVRO_DIR, END_OF_CALL_REPORT, SchemaStore, default_store
from tests.support.paths import DATA
from tests.support.samples import SAMPLE

# What records already on topics name their writer schema by: these must never change.
PUBLISHED_FINGERPRINTS = {
    ("end_of_call_report", 1): "cc841cd5034933c6",
    ("end_of_call_report", 2): "8d9aebf3eb605541",
    ("end_of_call_report", 3): "52df6af2565817c0",
    ("flireo_event", 1): "60b933dd85524ad6",
    ("flireo_event", 2): "4b024fc5cff50b62",
    ("rejected_request", 1): "f6dec7687b52d611",
}

# Records the v2 ingress (commit c54424d) wrote from the payloads in tests/data: what sits on
# topics today, before v3 mapped Vapi's shape and the new fields.
V2_RECORDS: dict[str, dict[str, Any]] = orjson.loads((DATA / "v2-records.json").read_bytes())


def _json(name: str, version: int) -> dict[str, Any]:
    text = default_store().versions(name)[version - 1].text
    schema: dict[str, Any] = json.loads(text)
    return schema


def _field(schema: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(f for f in schema["fields"] if f["name"] == name)
    return found


def _sample_record(**overrides: Any) -> dict[str, Any]:
    event = normalise(orjson.loads(SAMPLE.read_bytes()), received_at_ms=1, request_id="req-1")
    assert event.record is not None
    return event.record | overrides


def _v1_record() -> dict[str, Any]:
    record = _sample_record()
    del record["ended_reason"], record["assistant_name"]
    return record


def _write(schema: Any, record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema, named_schemas={}), record)
    return buf.getvalue()


def _read(reader: Any, writer: Any, body: bytes) -> Any:
    return fastavro.schemaless_reader(
        io.BytesIO(body),
        fastavro.parse_schema(writer, named_schemas={}),
        fastavro.parse_schema(reader, named_schemas={}),
    )


# -- evolution rules ---------------------------------------------------------------------


def test_repo_schemas_evolve_full_transitive() -> None:
    assert check_evolution(default_store()) == []


def test_every_version_pair_in_the_repo_is_mutually_compatible() -> None:
    store = default_store()
    for name in store.names():
        versions = store.versions(name)
        for reader in versions:
            for writer in versions:
                assert check_compatible(json.loads(reader.text), json.loads(writer.text)) == [], (
                    f"{name} v{reader.version} reading v{writer.version}"
                )


def test_published_fingerprints_never_change() -> None:
    store = default_store()
    published = {
        (v.name, v.version): v.fingerprint.hex() for n in store.names() for v in store.versions(n)
    }
    assert PUBLISHED_FINGERPRINTS.items() <= published.items()


def test_removing_a_default_breaks_reading_records_without_the_field() -> None:
    v1 = _json(END_OF_CALL_REPORT, 1)
    v3 = _json(END_OF_CALL_REPORT, 2)
    del _field(v3, "ended_reason")["default"]

    problems = check_compatible(reader=v3, writer=v1)

    assert problems == ["EndOfCallReport.ended_reason: not written and the reader has no default"]
    with pytest.raises(fastavro.read.SchemaResolutionError):  # the rule matches the library
        _read(v3, v1, _write(v1, _v1_record()))


def test_changing_int_to_string_is_a_break() -> None:
    old: dict[str, Any] = {
        "type": "record",
        "name": "R",
        "fields": [{"name": "n", "type": "int"}],
    }
    new = copy.deepcopy(old)
    _field(new, "n")["type"] = "string"

    assert check_compatible(reader=new, writer=old) == ["R.n: writer int cannot be read as string"]
    assert check_compatible(reader=old, writer=new) == ["R.n: writer string cannot be read as int"]
    with pytest.raises(fastavro.read.SchemaResolutionError):
        _read(new, old, _write(old, {"n": 7}))


def test_new_enum_symbol_without_an_enum_default_is_a_break() -> None:
    old = _json(END_OF_CALL_REPORT, 2)
    enum = _field(old, "source")["type"]["fields"][0]["type"]
    del enum["default"]
    new = copy.deepcopy(old)
    _field(new, "source")["type"]["fields"][0]["type"]["symbols"].append("NESTED_KEBAB")

    assert check_compatible(reader=new, writer=old) == []
    assert check_compatible(reader=old, writer=new) == [
        "EndOfCallReport.source.format: writer symbols ['NESTED_KEBAB'] are not in reader enum "
        "SourceFormat, which has no default"
    ]
    record = _sample_record(source={"format": "NESTED_KEBAB", "received_at": 1, "request_id": "r"})
    with pytest.raises(fastavro.read.SchemaResolutionError):
        _read(old, new, _write(new, record))


def test_new_enum_symbol_with_the_enum_default_is_fine() -> None:
    old = _json(END_OF_CALL_REPORT, 2)
    new = copy.deepcopy(old)
    _field(new, "source")["type"]["fields"][0]["type"]["symbols"].append("NESTED_KEBAB")

    assert check_compatible(reader=old, writer=new) == []
    record = _sample_record(source={"format": "NESTED_KEBAB", "received_at": 1, "request_id": "r"})
    assert _read(old, new, _write(new, record))["source"]["format"] == "UNKNOWN"


def test_new_field_without_a_default_is_a_break() -> None:
    old = _json(END_OF_CALL_REPORT, 2)
    new = copy.deepcopy(old)
    new["fields"].append({"name": "agent_id", "type": "string"})

    assert check_compatible(reader=new, writer=old) == [
        "EndOfCallReport.agent_id: not written and the reader has no default"
    ]
    assert check_compatible(reader=old, writer=new) == []  # old readers just skip it
    with pytest.raises(fastavro.read.SchemaResolutionError):
        _read(new, old, _write(old, _sample_record()))


def test_promotions_are_one_way() -> None:
    def wrap(kind: Any) -> dict[str, Any]:
        return {"type": "record", "name": "R", "fields": [{"name": "x", "type": kind}]}

    for writer, reader in [
        ("int", "long"),
        ("long", "double"),
        ("float", "double"),
        ("bytes", "string"),
    ]:
        assert check_compatible(wrap(reader), wrap(writer)) == [], (writer, reader)
    assert check_compatible(wrap("int"), wrap("long")) == ["R.x: writer long cannot be read as int"]
    assert check_compatible(wrap("float"), wrap("double")) != []


def test_logical_types_resolve_as_their_underlying_type() -> None:
    def wrap(kind: Any) -> dict[str, Any]:
        return {"type": "record", "name": "R", "fields": [{"name": "t", "type": kind}]}

    millis = {"type": "long", "logicalType": "timestamp-millis"}
    assert check_compatible(wrap(millis), wrap("long")) == []
    assert check_compatible(wrap("long"), wrap(millis)) == []
    assert check_compatible(wrap(millis), wrap("int")) == []  # int -> long promotion
    assert check_compatible(wrap(millis), wrap("string")) != []


def test_union_branches_must_each_resolve() -> None:
    def wrap(kind: Any) -> dict[str, Any]:
        return {"type": "record", "name": "R", "fields": [{"name": "u", "type": kind}]}

    assert check_compatible(wrap(["null", "string"]), wrap("string")) == []
    assert check_compatible(wrap(["null", "long", "double"]), wrap(["null", "int"])) == []
    assert check_compatible(wrap("string"), wrap(["null", "string"])) == [
        "R.u: writer null cannot be read as string (writer union branch)"
    ]
    assert check_compatible(wrap(["null", "long"]), wrap(["null", "long", "string"])) == [
        "R.u: writer string matches no branch of the reader union"
    ]


def test_fields_match_by_reader_alias_and_named_references_resolve() -> None:
    provenance: dict[str, Any] = {
        "type": "record",
        "name": "Provenance",
        "fields": [{"name": "request_id", "type": "string"}],
    }
    writer: dict[str, Any] = {
        "type": "record",
        "name": "Report",
        "namespace": "io.example",
        "fields": [
            {"name": "first", "type": provenance},
            {"name": "assistant_number", "type": "Provenance"},
        ],
    }
    reader = copy.deepcopy(writer)
    reader["fields"][1] = {
        "name": "to_number",
        "aliases": ["assistant_number"],
        "type": "io.example.Provenance",
    }
    assert check_compatible(reader, writer) == []

    without_alias = copy.deepcopy(reader)
    del without_alias["fields"][1]["aliases"]
    assert check_compatible(without_alias, writer) == [
        "Report.to_number: not written and the reader has no default"
    ]

    # One change to the named type breaks both fields: the reference resolves to it too.
    retyped = copy.deepcopy(writer)
    retyped["fields"][0]["type"]["fields"][0]["type"] = "long"
    assert check_compatible(retyped, writer) == [
        "Report.first.request_id: writer string cannot be read as long",
        "Report.assistant_number.request_id: writer string cannot be read as long",
    ]


def test_a_new_version_with_an_optional_field_and_no_docs_passes(tmp_path: Path) -> None:
    for path in AVRO_DIR.glob("*.avsc"):
        shutil.copy(path, tmp_path)
    v3 = _json(END_OF_CALL_REPORT, 2)
    del v3["doc"]
    for f in v3["fields"]:
        f.pop("doc", None)
    v3["fields"].append({"name": "agent_id", "type": ["null", "string"], "default": None})
    (tmp_path / "end_of_call_report.v3.avsc").write_text(json.dumps(v3))

    assert check_evolution(SchemaStore(tmp_path)) == []


def test_check_evolution_names_breaks_and_house_rule_violations(tmp_path: Path) -> None:
    for path in AVRO_DIR.glob("*.avsc"):
        shutil.copy(path, tmp_path)
    v3 = _json(END_OF_CALL_REPORT, 2)
    v3["fields"].append({"name": "agentId", "type": ["null", "string"], "default": None})
    v3["fields"].append({"name": "region", "type": "string"})
    v3["fields"] = [f for f in v3["fields"] if f["name"] != "call_id"]
    v3["namespace"] = "io.callstream.other"
    (tmp_path / "end_of_call_report.v3.avsc").write_text(json.dumps(v3))

    problems = check_evolution(SchemaStore(tmp_path))

    assert (
        "end_of_call_report v3: field io.callstream.other.EndOfCallReport.agentId is not snake_case"
        in problems
    )
    assert (
        "end_of_call_report v2 -> v3: the schema was renamed from "
        "io.callstream.flireo.EndOfCallReport to io.callstream.other.EndOfCallReport"
    ) in problems
    no_default = "not written and the reader has no default"
    assert f"end_of_call_report v3 cannot read v1: EndOfCallReport.region: {no_default}" in problems
    assert (
        f"end_of_call_report v2 cannot read v3: EndOfCallReport.call_id: {no_default}" in problems
    )
    assert all(p.startswith("end_of_call_report ") for p in problems)


def test_house_rules_flag_added_and_removed_fields_without_defaults(tmp_path: Path) -> None:
    base = {
        "type": "record",
        "name": "R",
        "namespace": "io.x",
        "fields": [{"name": "a", "type": "string"}],
    }
    grown = copy.deepcopy(base)
    grown["fields"] = [{"name": "b", "type": "string"}]
    (tmp_path / "r.v1.avsc").write_text(json.dumps(base))
    (tmp_path / "r.v2.avsc").write_text(json.dumps(grown))

    problems = check_evolution(SchemaStore(tmp_path))

    assert "r v1 -> v2: added field io.x.R.b has no default" in problems
    assert "r v1 -> v2: removed field io.x.R.a had no default" in problems


# -- reading across versions -------------------------------------------------------------


def test_current_reader_reads_records_written_with_v1() -> None:
    store = default_store()
    v1 = store.versions(END_OF_CALL_REPORT)[0]
    assert v1.version == 1
    body = io.BytesIO()
    fastavro.schemaless_writer(body, v1.parsed, _v1_record())

    decoded = Decoder(store).decode_local(SINGLE_OBJECT_MAGIC + v1.fingerprint + body.getvalue())

    assert (decoded.name, decoded.writer_version) == (END_OF_CALL_REPORT, 1)
    assert decoded.record["ended_reason"] is None
    assert decoded.record["assistant_name"] is None
    current = store.current(END_OF_CALL_REPORT).version
    assert decoded.record.keys() == {
        f["name"] for f in _json(END_OF_CALL_REPORT, current)["fields"]
    }
    report = CallReport.from_record(decoded.record)
    assert report.source_payload() == orjson.loads(SAMPLE.read_bytes())
    assert report.event_time_source == "sent"


@pytest.mark.parametrize("fixture", sorted(V2_RECORDS))
def test_records_the_v2_ingress_wrote_still_decode_and_rebuild_their_payload(
    fixture: str,
) -> None:
    store = default_store()
    v2 = store.versions(END_OF_CALL_REPORT)[1]
    body = io.BytesIO()
    fastavro.schemaless_writer(body, v2.parsed, V2_RECORDS[fixture])
    payload_file = DATA / fixture if (DATA / fixture).exists() else DATA / "payloads" / fixture

    decoded = Decoder(store).decode_local(SINGLE_OBJECT_MAGIC + v2.fingerprint + body.getvalue())

    assert decoded.writer_version == 2
    report = CallReport.from_record(decoded.record)
    # New fields read as their defaults; what v2 left in extra_json still rebuilds the input.
    assert (report.started_at, report.cost, report.transcript_turns) == (None, None, None)
    assert report.event_time_source == "sent"
    assert report.source_payload() == orjson.loads(payload_file.read_bytes())


def test_v2_reader_reads_a_v3_vapi_record_with_the_unknown_format_as_unknown() -> None:
    store = default_store()
    v2, current = store.versions(END_OF_CALL_REPORT)[1], store.current(END_OF_CALL_REPORT)
    payload = orjson.loads((DATA / "payloads" / "vapi-end-of-call.json").read_bytes())
    record = normalise(payload, received_at_ms=1, request_id="req-1").record
    wire = single_object_encoder(current).encode(record)

    old = fastavro.schemaless_reader(io.BytesIO(wire[10:]), current.parsed, v2.parsed)

    assert isinstance(old, dict)
    assert old["source"]["format"] == "UNKNOWN"  # the enum's default: VAPI is new in v3
    assert old["ended_reason"] == "assistant-ended-call"
    assert "started_at" not in old


def test_v1_reader_reads_records_written_with_the_current_version() -> None:
    store = default_store()
    v1, current = store.versions(END_OF_CALL_REPORT)[0], store.current(END_OF_CALL_REPORT)
    record = _sample_record(ended_reason="customer-ended-call", assistant_name="Flireo Demo")
    wire = single_object_encoder(current).encode(record)
    assert wire[:10] == SINGLE_OBJECT_MAGIC + current.fingerprint

    old = fastavro.schemaless_reader(io.BytesIO(wire[10:]), current.parsed, v1.parsed)

    assert isinstance(old, dict)
    assert old.keys() == {f["name"] for f in _json(END_OF_CALL_REPORT, 1)["fields"]}
    assert "ended_reason" not in old
    assert "assistant_name" not in old
    assert old["call_id"] == record["call_id"]
    assert old["duration_seconds"] == 132.5


# -- fingerprints ------------------------------------------------------------------------

_CRC64_EMPTY = 0xC15D213AA4D7A795
_CRC64_TABLE = []
for _byte in range(256):
    _fp = _byte
    for _ in range(8):
        _fp = (_fp >> 1) ^ (_CRC64_EMPTY & -(_fp & 1))
    _CRC64_TABLE.append(_fp)


def crc64_avro(data: bytes) -> int:
    """The Rabin fingerprint exactly as the Avro specification writes it out."""
    fp = _CRC64_EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _CRC64_TABLE[(fp ^ byte) & 0xFF]
    return fp


def test_crc64_matches_the_specification_test_vectors() -> None:
    # share/test/data/schema-tests.txt in apache/avro, published as signed 64-bit integers.
    vectors = {
        '"null"': 7195948357588979594,
        '"boolean"': -6970731678124411036,
        '"int"': 8247732601305521295,
        '{"name":"foo","type":"fixed","size":15}': 1756455273707447556,
    }
    for canonical, expected in vectors.items():
        assert crc64_avro(canonical.encode()) == expected % 2**64, canonical


def test_store_fingerprints_match_an_independent_crc64_of_the_canonical_form() -> None:
    store = default_store()
    for name in store.names():
        for version in store.versions(name):
            canonical = fastavro.schema.to_parsing_canonical_form(json.loads(version.text))
            expected = crc64_avro(canonical.encode()).to_bytes(8, "little")
            assert version.fingerprint == expected, f"{name} v{version.version}"
            assert single_object_encoder(version).prefix == b"\xc3\x01" + expected


# -- decoder errors ----------------------------------------------------------------------


def _current_wire() -> bytes:
    return single_object_encoder(default_store().current(END_OF_CALL_REPORT)).encode(
        _sample_record()
    )


async def test_unknown_fingerprint_is_an_unknown_schema() -> None:
    wire = _current_wire()
    with pytest.raises(UnknownSchemaError, match="fingerprint 0123456789abcdef"):
        await Decoder(default_store()).decode(
            wire[:2] + bytes.fromhex("0123456789abcdef") + wire[10:]
        )


def test_truncated_body_is_a_decode_error() -> None:
    wire = _current_wire()
    decoder = Decoder(default_store())
    for cut in (10, 11, len(wire) // 2, len(wire) - 1):
        with pytest.raises(DecodeError) as caught:
            decoder.decode_local(wire[:cut])
        assert type(caught.value) is DecodeError, cut


def test_unknown_magic_is_a_decode_error() -> None:
    decoder = Decoder(default_store())
    for data in (b"", b"{", b"\xc3\x02" + _current_wire()[2:], b"\x01\x00\x00\x00\x01"):
        with pytest.raises(DecodeError, match="unknown framing") as caught:
            decoder.decode_local(data)
        assert type(caught.value) is DecodeError


async def test_confluent_framing_without_a_registry_is_an_unknown_schema() -> None:
    body = _current_wire()[10:]
    with pytest.raises(UnknownSchemaError, match="no registry URL"):
        await Decoder(default_store()).decode(b"\x00" + (7).to_bytes(4, "big") + body)
    with pytest.raises(UnknownSchemaError):
        Decoder(default_store()).decode_local(b"\x00" + (7).to_bytes(4, "big") + body)


# -- the store ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_name",
    [
        "end_of_call_report.avsc",
        "EndOfCallReport.v1.avsc",
        "end_of_call_report.v0.avsc",
        "x.v01.avsc",
    ],
)
def test_store_rejects_misnamed_files(tmp_path: Path, bad_name: str) -> None:
    shutil.copy(AVRO_DIR / "end_of_call_report.v1.avsc", tmp_path / bad_name)
    with pytest.raises(SchemaError, match=r"named <name>\.v<N>\.avsc"):
        SchemaStore(tmp_path)


def test_store_rejects_a_version_identical_to_another(tmp_path: Path) -> None:
    shutil.copy(AVRO_DIR / "end_of_call_report.v2.avsc", tmp_path / "end_of_call_report.v2.avsc")
    # Reformatted and re-documented, but the same canonical form, so the same fingerprint.
    schema = _json(END_OF_CALL_REPORT, 2)
    schema["doc"] = "v3: nothing but a new doc"
    (tmp_path / "end_of_call_report.v3.avsc").write_text(json.dumps(schema, indent=1))
    with pytest.raises(SchemaError, match="identical to another version"):
        SchemaStore(tmp_path)


def test_store_serves_the_highest_version_as_current(tmp_path: Path) -> None:
    for path in AVRO_DIR.glob("end_of_call_report.v*.avsc"):
        shutil.copy(path, tmp_path)
    store = SchemaStore(tmp_path)
    assert [v.version for v in store.versions(END_OF_CALL_REPORT)] == [1, 2, 3]
    assert store.current(END_OF_CALL_REPORT).version == 3
    with pytest.raises(SchemaError, match="no schema named"):
        store.versions("flireo_event")


def test_record_headers_round_trip_under_their_wire_names() -> None:
    headers = RecordHeaders("end-of-call-report", "7", "confluent", "FLAT", "r-1")
    encoded = headers.encode()
    assert [name for name, _ in encoded] == [
        "event-type",
        "schema-id",
        "wire-format",
        "source-format",
        "request-id",
    ]
    assert RecordHeaders.parse([("other", b"x"), *encoded]) == headers
    with pytest.raises(SchemaError, match="request-id"):
        RecordHeaders.parse(encoded[:-1])


def test_a_report_goes_back_to_the_record_it_was_read_from() -> None:
    """`to_record` (re-publishing from storage) gives every JSON field back as the record's
    JSON text, the transcript's turns included, so the record encodes and reads back equal."""
    store = default_store()
    encoder = single_object_encoder(store.current(END_OF_CALL_REPORT))
    record = Decoder(store).decode_local(encoder.encode(_sample_record())).record
    report = CallReport.from_record(record)
    assert report.transcript_turns, "the sample has a transcript to split into turns"

    again = Decoder(store).decode_local(encoder.encode(report.to_record())).record

    assert CallReport.from_record(again) == report
    assert again.keys() == record.keys()
