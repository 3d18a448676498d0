"""The Kafka headers every callstream record carries, spelled once: the ingress builds them,
replay and the benchmark rebuild them, consumers and tests parse them.

They describe the value without decoding it (what event, which schema, which framing, how
it arrived, which request), so tools such as kcat can route and filter on them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Final

from schemas.errors import SchemaError

# Header name per field of RecordHeaders, in the order they go on the record.
NAMES: Final = {
    "event_type": "event-type",
    "schema_id": "schema-id",
    "wire_format": "wire-format",
    "source_format": "source-format",
    "request_id": "request-id",
}


@dataclass(frozen=True, slots=True)
class RecordHeaders:
    event_type: str  # Flireo's type, e.g. end-of-call-report
    schema_id: str  # registry id (confluent) or fingerprint hex (single-object)
    wire_format: str  # the value's framing: confluent or avro-single-object
    source_format: str  # which payload shape the webhook arrived in: FLAT, NESTED_CAMEL, ...
    request_id: str  # the ingress request that produced the record

    def encode(self) -> tuple[tuple[str, bytes], ...]:
        """The headers as Kafka takes them."""
        return tuple((NAMES[f.name], getattr(self, f.name).encode()) for f in fields(self))

    @classmethod
    def parse(cls, headers: Iterable[tuple[str, bytes | None]]) -> RecordHeaders:
        """From a record's headers (others ignored); a missing one is a SchemaError."""
        found = {name: value for name, value in headers}
        values: dict[str, str] = {}
        for field, name in NAMES.items():
            raw = found.get(name)
            if raw is None:
                raise SchemaError(f"the record has no {name} header")
            values[field] = raw.decode(errors="replace")
        return cls(**values)
