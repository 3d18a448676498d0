"""Avro on the wire: encode with the current schema, decode whatever any version wrote.

Two framings, told apart by the first byte:

* Avro single-object encoding (the default, no registry needed): ``C3 01``, the writer
  schema's 8-byte CRC-64-AVRO fingerprint (little-endian), then the Avro binary body.
  Readers resolve the fingerprint against the ``.avsc`` files in ``schemas/avro``.
* Confluent Schema Registry framing (when a registry URL is configured): ``00``, the
  4-byte big-endian registry id, then the Avro binary body.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import fastavro
import orjson

from core.kafkasettings import KafkaSettings
from schemas.errors import DecodeError, SchemaError, UnknownSchemaError
from schemas.registry import RegistryClient, registry_client
from schemas.store import (
    END_OF_CALL_REPORT,
    FLIREO_EVENT,
    REJECTED_REQUEST,
    SchemaStore,
    SchemaVersion,
)

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"


@dataclass(frozen=True, slots=True)
class Encoder:
    schema: SchemaVersion
    wire_format: Literal["avro-single-object", "confluent"]
    prefix: bytes
    # What a Kafka header names the schema by: fingerprint hex, or the registry id.
    schema_id: str

    def encode(self, record: dict[str, Any]) -> bytes:
        buf = io.BytesIO()
        buf.write(self.prefix)
        try:
            fastavro.schemaless_writer(buf, self.schema.parsed, record)
        except (ValueError, TypeError) as exc:
            raise SchemaError(
                f"record does not fit {self.schema.name} v{self.schema.version}: {exc}"
            ) from exc
        return buf.getvalue()


def single_object_encoder(schema: SchemaVersion) -> Encoder:
    return Encoder(
        schema,
        "avro-single-object",
        SINGLE_OBJECT_MAGIC + schema.fingerprint,
        schema.fingerprint.hex(),
    )


def topics_by_schema(kafka: KafkaSettings) -> dict[str, str]:
    return {
        END_OF_CALL_REPORT: kafka.topic,
        FLIREO_EVENT: kafka.events_topic,
        REJECTED_REQUEST: kafka.rejected_topic,
    }


async def encoders_for(
    kafka: KafkaSettings, store: SchemaStore, session: aiohttp.ClientSession
) -> dict[str, Encoder]:
    """An encoder per schema: registered under `<topic>-value` when `kafka` names a registry,
    single-object encoding otherwise."""
    client = registry_client(kafka, session)
    encoders = {}
    for name, topic in topics_by_schema(kafka).items():
        schema = store.current(name)
        if client is None:
            encoders[name] = single_object_encoder(schema)
            continue
        schema_id = await client.register(f"{topic}-value", schema.text)
        prefix = CONFLUENT_MAGIC + schema_id.to_bytes(4, "big")
        encoders[name] = Encoder(schema, "confluent", prefix, str(schema_id))
    return encoders


@dataclass(frozen=True, slots=True)
class Decoded:
    name: str
    writer_version: int | None  # None: written with a registry schema not in this repo
    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Resolution:
    name: str
    writer_version: int | None
    writer: Any
    # None when writer and reader are the same schema: fastavro then skips resolution.
    reader: Any


class Decoder:
    """Decodes both framings into records shaped by the *current* version of their schema."""

    def __init__(self, store: SchemaStore, registry: RegistryClient | None = None) -> None:
        self._store = store
        self._registry = registry
        self._by_fingerprint: dict[bytes, _Resolution] = {}
        self._by_registry_id: dict[int, _Resolution] = {}

    def decode_local(self, data: bytes) -> Decoded:
        """Decode without I/O; a registry id not seen before raises UnknownSchemaError."""
        if data[:2] == SINGLE_OBJECT_MAGIC:
            fingerprint = data[2:10]
            resolution = self._by_fingerprint.get(fingerprint)
            if resolution is None:
                version = self._store.by_fingerprint(fingerprint)
                if version is None:
                    raise UnknownSchemaError(
                        f"no schema in this repo has fingerprint {fingerprint.hex()}"
                    )
                resolution = self._resolution_for(version.parsed, version)
                self._by_fingerprint[fingerprint] = resolution
            return self._read(resolution, data, 10)
        if data[:1] == CONFLUENT_MAGIC and len(data) >= 5:
            schema_id = int.from_bytes(data[1:5], "big")
            by_id = self._by_registry_id.get(schema_id)
            if by_id is None:
                raise UnknownSchemaError(f"registry schema id {schema_id} not resolved yet")
            return self._read(by_id, data, 5)
        raise DecodeError(f"not an Avro record: unknown framing {data[:2].hex() or 'empty'}")

    async def decode(self, data: bytes) -> Decoded:
        try:
            return self.decode_local(data)
        except UnknownSchemaError:
            if data[:1] != CONFLUENT_MAGIC:
                raise
        # Only an unresolved registry id gets here: decode_local checked its 4 bytes are there.
        schema_id = int.from_bytes(data[1:5], "big")
        if self._registry is None:
            raise UnknownSchemaError(
                f"record framed for a schema registry (id {schema_id}) but no registry URL is set"
            )
        text = await self._registry.schema_by_id(schema_id)
        try:
            writer = fastavro.parse_schema(orjson.loads(text), named_schemas={})
        except (ValueError, fastavro.schema.SchemaParseException) as exc:
            raise DecodeError(f"registry schema {schema_id} is not valid Avro: {exc}") from exc
        self._by_registry_id[schema_id] = self._resolution_for(writer, None)
        return self.decode_local(data)

    def _resolution_for(self, writer: Any, version: SchemaVersion | None) -> _Resolution:
        if not isinstance(writer, dict) or "name" not in writer:
            raise DecodeError("the writer schema is not a named record")
        full_name = writer["name"]
        currents = map(self._store.current, self._store.names())
        current = next((c for c in currents if c.parsed["name"] == full_name), None)
        if current is None:
            raise UnknownSchemaError(f"no schema in this repo reads {full_name}")
        same = version is not None and version.fingerprint == current.fingerprint
        return _Resolution(
            current.name,
            version.version if version is not None else None,
            writer,
            None if same else current.parsed,
        )

    @staticmethod
    def _read(resolution: _Resolution, data: bytes, offset: int) -> Decoded:
        buf = io.BytesIO(data)
        buf.seek(offset)
        try:
            record = fastavro.schemaless_reader(buf, resolution.writer, resolution.reader)
        except Exception as exc:  # fastavro raises many types for truncated/garbled bodies
            raise DecodeError(
                f"cannot decode {resolution.name}: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(record, dict):
            raise DecodeError(f"{resolution.name} decoded to {type(record).__name__}, not a record")
        return Decoded(resolution.name, resolution.writer_version, record)
