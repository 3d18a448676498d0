"""Confluent framing end to end: ingress -> real schema registry + real broker -> decoder.

The registry is Apicurio's Confluent-compatible API run as a local JVM
(tests.support.registry). Without a Java >= 21 the fixture raises: these tests fail, they are
never skipped.
"""

from __future__ import annotations

import dataclasses
import io
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import fastavro
import fastavro.schema
import orjson
import pytest

from core.kafkasettings import KafkaSettings
from core.secret import Secret
from core.signing import WEBHOOK_PATH
from core.topicreader import RawRecord, read_topic
from ingress.settings import IngressSettings
from schemas.codec import CONFLUENT_MAGIC, Decoder
from schemas.errors import SchemaError, UnknownSchemaError
from schemas.headers import RecordHeaders
from schemas.registry import RegistryClient, registry_client
from schemas.report import CallReport
from schemas.store import END_OF_CALL_REPORT, default_store
from tests.conftest import TEST_SECRET, Client, start_ingress
from tests.signing import signed
from tests.support.authproxy import AuthProxy
from tests.support.paths import DATA
from tests.support.registry import SchemaRegistryServer
from tests.support.samples import SAMPLE

NESTED_CAMEL = DATA / "nested-camel.json"


@pytest.fixture(scope="module")
def registry_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = SchemaRegistryServer(tmp_path_factory.mktemp("schema-registry"))
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
async def registry(registry_url: str) -> AsyncIterator[RegistryClient]:
    async with aiohttp.ClientSession() as session:
        yield RegistryClient(registry_url, session)


@pytest.fixture
async def registry_ingress(
    ingress_settings: IngressSettings, kafka: KafkaSettings, registry_url: str
) -> AsyncIterator[Client]:
    settings = dataclasses.replace(
        ingress_settings, kafka=dataclasses.replace(kafka, schema_registry_url=registry_url)
    )
    client = await start_ingress(settings)
    try:
        yield client
    finally:
        await client.close()


async def _post(client: Client, body: bytes) -> None:
    resp = await client.post(WEBHOOK_PATH, data=body, headers=signed(body, TEST_SECRET))
    assert resp.status == 202, await resp.text()


async def _records(kafka: KafkaSettings, expect: int) -> list[RawRecord]:
    out = [raw async for raw in read_topic(kafka, kafka.topic, idle_timeout=10.0, limit=expect)]
    assert len(out) == expect
    return out


async def _latest_id(registry_url: str, subject: str) -> int:
    """The id the registry itself reports, independent of what the ingress put in headers."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{registry_url}/subjects/{subject}/versions/latest") as resp,
    ):
        assert resp.status == 200, await resp.text()
        latest = orjson.loads(await resp.read())
    assert latest["subject"] == subject
    return int(latest["id"])


def _same_json(a: object, b: object) -> bool:
    return orjson.dumps(a, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        b, option=orjson.OPT_SORT_KEYS
    )


async def test_record_is_framed_with_the_registry_id_of_the_current_schema(
    registry_ingress: Client, kafka: KafkaSettings, registry_url: str
) -> None:
    await _post(registry_ingress, SAMPLE.read_bytes())

    [raw] = await _records(kafka, 1)

    schema_id = await _latest_id(registry_url, f"{kafka.topic}-value")
    assert raw.value[:5] == CONFLUENT_MAGIC + schema_id.to_bytes(4, "big")
    headers = RecordHeaders.parse(raw.headers)
    assert headers.wire_format == "confluent"
    assert headers.schema_id == str(schema_id)
    assert headers.event_type == "end-of-call-report"
    assert headers.source_format == "FLAT"
    async with aiohttp.ClientSession() as session:
        registered = await RegistryClient(registry_url, session).schema_by_id(schema_id)
    current = default_store().current(END_OF_CALL_REPORT)
    assert fastavro.schema.to_parsing_canonical_form(
        orjson.loads(registered)
    ) == fastavro.schema.to_parsing_canonical_form(orjson.loads(current.text))


async def test_decoder_with_a_registry_gives_back_the_exact_payload(
    registry_ingress: Client, kafka: KafkaSettings, registry: RegistryClient
) -> None:
    await _post(registry_ingress, SAMPLE.read_bytes())
    [raw] = await _records(kafka, 1)

    decoded = await Decoder(default_store(), registry).decode(raw.value)

    assert decoded.name == END_OF_CALL_REPORT
    report = CallReport.from_record(decoded.record)
    assert _same_json(report.source_payload(), orjson.loads(SAMPLE.read_bytes()))
    assert report.request_id == RecordHeaders.parse(raw.headers).request_id


async def test_decoder_without_a_registry_cannot_resolve_confluent_records(
    registry_ingress: Client, kafka: KafkaSettings
) -> None:
    await _post(registry_ingress, SAMPLE.read_bytes())
    [raw] = await _records(kafka, 1)

    with pytest.raises(UnknownSchemaError, match="no registry URL"):
        await Decoder(default_store()).decode(raw.value)


async def test_one_decoder_reads_a_topic_holding_both_framings(
    registry_ingress: Client,
    ingress: Client,
    kafka: KafkaSettings,
    registry: RegistryClient,
) -> None:
    # Both ingresses write the same topic: one through the registry, one without.
    sent = {
        "cc1abf4a-d005-44a8-825f-702334e8d4c8": (SAMPLE.read_bytes(), "confluent"),
        "5c4d030f-8f7b-4e0c-9a51-2f3b1f6e9d11": (NESTED_CAMEL.read_bytes(), "avro-single-object"),
    }
    for body, wire_format in sent.values():
        await _post(registry_ingress if wire_format == "confluent" else ingress, body)

    records = await _records(kafka, 2)

    decoder = Decoder(default_store(), registry)
    for raw in records:
        assert raw.key is not None
        body, wire_format = sent[raw.key.decode()]
        assert RecordHeaders.parse(raw.headers).wire_format == wire_format
        report = CallReport.from_record((await decoder.decode(raw.value)).record)
        assert _same_json(report.source_payload(), orjson.loads(body))
    assert {raw.value[:1] for raw in records} == {b"\x00", b"\xc3"}


async def test_registry_record_written_with_v1_decodes_into_the_current_shape(
    registry: RegistryClient,
) -> None:
    v1 = default_store().versions(END_OF_CALL_REPORT)[0]
    schema_id = await registry.register(f"test.{uuid.uuid4().hex[:12]}.v1-value", v1.text)
    record = {
        "call_id": "call-v1",
        "event_type": "end-of-call-report",
        "event_time": 1_756_294_820_944,
        "duration_seconds": 12,
        "source": {"format": "FLAT", "received_at": 1_756_294_821_000, "request_id": "r1"},
    }
    body = io.BytesIO()
    fastavro.schemaless_writer(body, v1.parsed, record)

    decoded = await Decoder(default_store(), registry).decode(
        CONFLUENT_MAGIC + schema_id.to_bytes(4, "big") + body.getvalue()
    )

    assert decoded.name == END_OF_CALL_REPORT
    assert decoded.writer_version is None  # the registry names schemas by id, not by file
    assert decoded.record["call_id"] == "call-v1"
    assert decoded.record["duration_seconds"] == 12
    assert decoded.record["ended_reason"] is None
    assert decoded.record["assistant_name"] is None


@pytest.fixture
async def guarded_registry(registry_url: str, tmp_path: Path) -> AsyncIterator[AuthProxy]:
    proxy = AuthProxy(registry_url, tmp_path / "tls", "registry-key", "registry-secret")
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


def _guarded(kafka: KafkaSettings, proxy: AuthProxy, password: str) -> KafkaSettings:
    return dataclasses.replace(
        kafka,
        schema_registry_url=proxy.url,
        schema_registry_username="registry-key",
        schema_registry_password=Secret(password),
        schema_registry_cafile=proxy.tls.ca_cert,
    )


async def test_a_registry_behind_tls_and_basic_auth_is_used_with_its_credentials(
    ingress_settings: IngressSettings, kafka: KafkaSettings, guarded_registry: AuthProxy
) -> None:
    """Oracle: the ingress registers and frames with the guarded registry (trusting its CA,
    sending its credentials), and a consumer's decoder resolves the id through it too."""
    guarded = _guarded(kafka, guarded_registry, "registry-secret")
    client = await start_ingress(dataclasses.replace(ingress_settings, kafka=guarded))
    try:
        await _post(client, SAMPLE.read_bytes())
    finally:
        await client.close()
    [raw] = await _records(kafka, 1)
    assert raw.value[0] == CONFLUENT_MAGIC[0]
    async with aiohttp.ClientSession() as session:
        decoded = await Decoder(default_store(), registry_client(guarded, session)).decode(
            raw.value
        )
    assert decoded.record["call_id"] == orjson.loads(SAMPLE.read_bytes())["callId"]
    assert guarded_registry.refused == 0


async def test_a_wrong_registry_password_is_refused_with_the_registry_s_answer(
    kafka: KafkaSettings, guarded_registry: AuthProxy
) -> None:
    async with aiohttp.ClientSession() as session:
        client = registry_client(_guarded(kafka, guarded_registry, "wrong"), session)
        assert client is not None
        with pytest.raises(SchemaError, match="HTTP 401"):
            await client.register("guarded-value", '"string"')
    assert guarded_registry.refused == 1
