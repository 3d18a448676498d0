"""The local schema registry (Apicurio's Confluent-compatible API) registers and serves Avro."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import fastavro
import pytest

from tests.support.registry import SchemaRegistryServer

SUBJECT = "call-reports-value"
CONFLUENT_JSON = "application/vnd.schemaregistry.v1+json"

CALL_V1: dict[str, Any] = {
    "type": "record",
    "name": "CallReport",
    "namespace": "io.callstream.test",
    "fields": [
        {"name": "call_id", "type": "string"},
        {"name": "duration_ms", "type": "long"},
    ],
}
CALL_V2: dict[str, Any] = {
    **CALL_V1,
    "fields": [*CALL_V1["fields"], {"name": "agent", "type": ["null", "string"], "default": None}],
}


@pytest.fixture(scope="module")
def registry_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = SchemaRegistryServer(tmp_path_factory.mktemp("schema-registry"))
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


async def _call(
    session: aiohttp.ClientSession, method: str, url: str, body: dict[str, Any] | None = None
) -> Any:
    data = None if body is None else json.dumps(body)
    async with session.request(method, url, data=data) as response:
        text = await response.text()
        assert response.status == 200, f"{method} {url} -> {response.status}: {text}"
        return json.loads(text)


async def test_registers_and_fetches_an_avro_schema(registry_url: str) -> None:
    headers = {"Content-Type": CONFLUENT_JSON, "Accept": CONFLUENT_JSON}
    async with aiohttp.ClientSession(headers=headers) as session:
        versions = f"{registry_url}/subjects/{SUBJECT}/versions"
        registered = await _call(session, "POST", versions, {"schema": json.dumps(CALL_V1)})
        schema_id = registered["id"]
        assert isinstance(schema_id, int)

        # Registering the same schema again (even spelled differently) is idempotent.
        again = await _call(session, "POST", versions, {"schema": json.dumps(CALL_V1, indent=2)})
        assert again == {"id": schema_id}

        fetched = await _call(session, "GET", f"{registry_url}/schemas/ids/{schema_id}")
        assert json.loads(fetched["schema"]) == CALL_V1
        fastavro.parse_schema(json.loads(fetched["schema"]))  # usable by the serializer

        latest = await _call(session, "GET", f"{versions}/latest")
        assert (latest["subject"], latest["version"], latest["id"]) == (SUBJECT, 1, schema_id)

        verdict = await _call(
            session,
            "POST",
            f"{registry_url}/compatibility/subjects/{SUBJECT}/versions/latest",
            {"schema": json.dumps(CALL_V2)},
        )
        assert verdict == {"is_compatible": True}
