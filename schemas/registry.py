"""A small client for the Confluent Schema Registry REST API (also served by Karapace and
by Apicurio under /apis/ccompat/v7)."""

from __future__ import annotations

import base64
import ssl

import aiohttp
import orjson

from core.kafkasettings import KafkaSettings
from core.secret import Secret
from schemas.errors import SchemaError, UnknownSchemaError

_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class RegistryClient:
    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        *,
        credentials: tuple[str, Secret] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._session = session
        # Per request rather than on the session: the session is the caller's, shared with
        # other uses (alert channels, the ingress's own), which must not send these.
        # Built once: a header rather than aiohttp's BasicAuth, which is on its way out.
        self._headers: dict[str, str] = {}
        if credentials is not None:
            user, password = credentials
            token = base64.b64encode(f"{user}:{password.reveal()}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        self._ssl: ssl.SSLContext | bool = True if ssl_context is None else ssl_context

    async def register(self, subject: str, schema_text: str) -> int:
        """Register (or look up: registering is idempotent) a schema; returns its global id."""
        url = f"{self._base}/subjects/{subject}/versions"
        body = orjson.dumps({"schemaType": "AVRO", "schema": schema_text})
        try:
            async with self._session.post(
                url,
                data=body,
                headers={"Content-Type": _CONTENT_TYPE, **self._headers},
                ssl=self._ssl,
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
            async with self._session.get(url, headers=self._headers, ssl=self._ssl) as resp:
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


def registry_client(kafka: KafkaSettings, session: aiohttp.ClientSession) -> RegistryClient | None:
    """The registry `kafka` names, with its credentials and CA; None when there is none."""
    if kafka.schema_registry_url is None:
        return None
    credentials = None
    if kafka.schema_registry_username is not None:
        password = kafka.schema_registry_password or Secret("")
        credentials = (kafka.schema_registry_username, password)
    context = None
    if kafka.schema_registry_cafile is not None:
        context = ssl.create_default_context(cafile=kafka.schema_registry_cafile)
    return RegistryClient(
        kafka.schema_registry_url, session, credentials=credentials, ssl_context=context
    )
