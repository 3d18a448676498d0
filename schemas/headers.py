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


@dataclass(frozen=True, slots=True)
class RecordHeaders:
    event_type: str  # Flireo's type, e.g. end-of-call-report
    schema_id: str  # registry id (confluent) or fingerprint hex (single-object)
    wire_format: str  # the value's framing: confluent or avro-single-object
    source_format: str  # which payload shape the webhook arrived in: FLAT, NESTED_CAMEL, ...
    request_id: str  # the ingress request that produced the record

    def encode(self) -> tuple[tuple[str, bytes], ...]:
        return tuple((name, getattr(self, field).encode()) for field, name in NAMES.items())

    @classmethod
    def parse(cls, headers: Iterable[tuple[str, bytes | None]]) -> RecordHeaders:
        """From a record's headers (others ignored); a missing one is a SchemaError."""
        found = dict(headers)
        values: dict[str, str] = {}
        for field, name in NAMES.items():
            raw = found.get(name)
            if raw is None:
                raise SchemaError(f"the record has no {name} header")
            values[field] = raw.decode(errors="replace")
        return cls(**values)


# Header name per field (its name with dashes), in the order they go on the record.
NAMES: Final = {f.name: f.name.replace("_", "-") for f in fields(RecordHeaders)}
