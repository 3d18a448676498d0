"""A small client for the Confluent Schema Registry REST API (also served by Karapace and
by Apicurio under /apis/ccompat/v7)."""

from __future__ import annotations

import aiohttp
import orjson

from schemas.errors import SchemaError, UnknownSchemaError

_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class RegistryClient:
    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self._base = base_url.rstrip("/")
        self._session = session

    async def register(self, subject: str, schema_text: str) -> int:
        """Register (or look up: registering is idempotent) a schema; returns its global id."""
        url = f"{self._base}/subjects/{subject}/versions"
        body = orjson.dumps({"schemaType": "AVRO", "schema": schema_text})
        try:
            async with self._session.post(
                url, data=body, headers={"Content-Type": _CONTENT_TYPE}
            ) as resp:
                payload = await resp.read()
                if resp.status >= 300:
                    raise SchemaError(
                        f"schema registry refused {subject}: HTTP {resp.status} {payload[:300]!r}"
                    )
        except aiohttp.ClientError as exc:
            raise SchemaError(f"schema registry unreachable at {self._base}: {exc}") from exc
        try:
            return int(orjson.loads(payload)["id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SchemaError(f"schema registry answered without an id: {payload[:200]!r}") from exc

    async def schema_by_id(self, schema_id: int) -> str:
        url = f"{self._base}/schemas/ids/{schema_id}"
        try:
            async with self._session.get(url) as resp:
                payload = await resp.read()
                if resp.status == 404:
                    raise UnknownSchemaError(f"schema id {schema_id} is not in the registry")
                if resp.status >= 300:
                    raise SchemaError(f"schema registry: HTTP {resp.status} for id {schema_id}")
        except aiohttp.ClientError as exc:
            raise SchemaError(f"schema registry unreachable at {self._base}: {exc}") from exc
        try:
            return str(orjson.loads(payload)["schema"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SchemaError(
                f"schema registry answered without a schema for id {schema_id}"
            ) from exc
