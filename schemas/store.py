"""The versioned `.avsc` files in `schemas/avro/`, each parsed once per process.

File names are `<name>.v<N>.avsc`; the highest N of a name is the version writers use.
Every version stays in the repo forever, because records written with it may still sit on
the topic and readers resolve them by fingerprint.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
import fastavro.schema

from schemas.errors import SchemaError

AVRO_DIR = Path(__file__).parent / "avro"
END_OF_CALL_REPORT = "end_of_call_report"
FLIREO_EVENT = "flireo_event"
REJECTED_REQUEST = "rejected_request"

_FILE_NAME = re.compile(r"^(?P<name>[a-z0-9_]+)\.v(?P<version>[1-9][0-9]*)\.avsc$")


@dataclass(frozen=True, slots=True)
class SchemaVersion:
    name: str
    version: int
    text: str = field(repr=False)
    parsed: Any = field(repr=False, compare=False)
    # CRC-64-AVRO of the Parsing Canonical Form, little-endian, as single-object encoding
    # puts it on the wire.
    fingerprint: bytes


class SchemaStore:
    """All schema versions found in one directory, indexed by name and by fingerprint."""

    def __init__(self, directory: Path = AVRO_DIR) -> None:
        self._by_name: dict[str, list[SchemaVersion]] = {}
        self._by_fingerprint: dict[bytes, SchemaVersion] = {}
        paths = sorted(directory.glob("*.avsc"))
        if not paths:
            raise SchemaError(f"no .avsc files in {directory}")
        for path in paths:
            match = _FILE_NAME.match(path.name)
            if match is None:
                raise SchemaError(f"{path.name}: schema files are named <name>.v<N>.avsc")
            version = _load(path, match["name"], int(match["version"]))
            if version.fingerprint in self._by_fingerprint:
                raise SchemaError(f"{path.name} is identical to another version")
            self._by_name.setdefault(version.name, []).append(version)
            self._by_fingerprint[version.fingerprint] = version
        for versions in self._by_name.values():
            versions.sort(key=lambda v: v.version)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def versions(self, name: str) -> list[SchemaVersion]:
        try:
            return list(self._by_name[name])
        except KeyError:
            raise SchemaError(f"no schema named {name!r}") from None

    def current(self, name: str) -> SchemaVersion:
        return self.versions(name)[-1]

    def by_fingerprint(self, fingerprint: bytes) -> SchemaVersion | None:
        return self._by_fingerprint.get(fingerprint)


def _load(path: Path, name: str, version: int) -> SchemaVersion:
    text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text)
        # A fresh named-schema table per file: each .avsc must stand on its own so that a
        # consumer in another language can decode with that one file.
        parsed = fastavro.parse_schema(raw, named_schemas={})
    except (ValueError, fastavro.schema.SchemaParseException) as exc:
        raise SchemaError(f"{path.name}: {exc}") from exc
    canonical = fastavro.schema.to_parsing_canonical_form(raw)
    fingerprint = bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))
    return SchemaVersion(name, version, text, parsed, fingerprint)


@cache
def default_store() -> SchemaStore:
    return SchemaStore()
