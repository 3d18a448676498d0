"""The schema evolution rules as code (docs/schema-evolution.md says them in prose).

`check_compatible` applies Avro's schema-resolution rules (specification, "Schema
Resolution") to the parts of Avro callstream uses. `check_evolution` holds every schema in a
store to FULL_TRANSITIVE compatibility (each version reads data written by every other) plus
the house rules that keep the contract boring to change.

Both return a list of problems rather than raising, so one run names every break at once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise, permutations
from typing import Any

from schemas.store import SchemaStore

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
# (writer, reader) pairs a reader accepts although the types differ.
PROMOTIONS = frozenset(
    {
        ("int", "long"),
        ("int", "float"),
        ("int", "double"),
        ("long", "float"),
        ("long", "double"),
        ("float", "double"),
        ("string", "bytes"),
        ("bytes", "string"),
    }
)
_NAMED = ("record", "enum", "fixed")
# The one child schema of each container type, and how a path names it.
_CONTAINERS = {"array": ("items", "[]"), "map": ("values", "{}")}
_SNAKE_CASE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def _full_name(name: str, namespace: str | None) -> str:
    if "." in name or not namespace:
        return name
    return f"{namespace}.{name}"


def _namespace_of(schema: dict[str, Any], enclosing: str | None) -> str | None:
    name = str(schema["name"])
    if "." in name:
        return name.rsplit(".", 1)[0]
    return schema.get("namespace", enclosing) or None


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


@dataclass(frozen=True, slots=True)
class _Node:
    """A schema with the namespace its relative names resolve in."""

    schema: Any
    namespace: str | None


class _Names:
    """Named types of one schema by full name, so that a reference can find its definition."""

    def __init__(self, schema: Any) -> None:
        self.table: dict[str, _Node] = {}
        self._collect(schema, None)

    def _collect(self, schema: Any, namespace: str | None) -> None:
        if isinstance(schema, list):
            for branch in schema:
                self._collect(branch, namespace)
        elif isinstance(schema, dict):
            kind = schema.get("type")
            if kind in _NAMED:
                inner = _namespace_of(schema, namespace)
                self.table[_full_name(str(schema["name"]), inner)] = _Node(schema, inner)
                for child in schema.get("fields", ()):
                    self._collect(child["type"], inner)
            elif kind in _CONTAINERS:
                self._collect(schema[_CONTAINERS[kind][0]], namespace)

    def deref(self, node: _Node) -> _Node:
        """Follow a reference; unwrap `{"type": "long", "logicalType": ...}` to `"long"`."""
        schema = node.schema
        if isinstance(schema, dict) and schema.get("type") not in (*_NAMED, *_CONTAINERS):
            # A primitive with attributes: logical types resolve as their underlying type.
            return self.deref(_Node(schema["type"], node.namespace))
        if isinstance(schema, str) and schema not in PRIMITIVES:
            for candidate in (_full_name(schema, node.namespace), schema):
                if candidate in self.table:
                    return self.table[candidate]
            raise ValueError(f"unknown type {schema!r}")
        if isinstance(schema, dict) and schema["type"] in _NAMED:
            return _Node(schema, _namespace_of(schema, node.namespace))
        return node


def _kind(schema: Any) -> str:
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, dict):
        return str(schema["type"])
    return str(schema)


def _describe(schema: Any) -> str:
    if isinstance(schema, dict) and "name" in schema:
        return f"{schema['type']} {schema['name']}"
    return _kind(schema)


@dataclass(slots=True)
class _Resolver:
    reader_names: _Names
    writer_names: _Names
    # Pairs of named types already being compared: recursive types end here.
    visiting: set[tuple[str, str]] = field(default_factory=set)

    def check(self, reader: _Node, writer: _Node, path: str) -> Iterator[str]:
        reader = self.reader_names.deref(reader)
        writer = self.writer_names.deref(writer)
        r, w = reader.schema, writer.schema
        if isinstance(w, list):
            for branch in w:
                if isinstance(r, list):
                    yield from self._into_union(reader, _Node(branch, writer.namespace), path)
                else:
                    for problem in self.check(reader, _Node(branch, writer.namespace), path):
                        yield f"{problem} (writer union branch)"
            return
        if isinstance(r, list):
            yield from self._into_union(reader, writer, path)
            return
        rk, wk = _kind(r), _kind(w)
        if rk != wk:
            # Only primitives promote; any other difference of kind is a break.
            if (wk, rk) not in PROMOTIONS:
                yield f"{path}: writer {_describe(w)} cannot be read as {_describe(r)}"
            return
        if rk in _NAMED and not _names_match(r, w):
            yield f"{path}: writer {_describe(w)} is not reader {_describe(r)} (nor an alias)"
            return
        if rk == "record":
            yield from self._record(reader, writer, path)
        elif rk == "enum":
            yield from _enum(r, w, path)
        elif rk == "fixed" and r["size"] != w["size"]:
            yield f"{path}: fixed size {w['size']} cannot be read as size {r['size']}"
        elif rk in _CONTAINERS:
            child, step = _CONTAINERS[rk]
            yield from self.check(
                _Node(r[child], reader.namespace), _Node(w[child], writer.namespace), path + step
            )

    def _into_union(self, reader: _Node, writer: _Node, path: str) -> Iterator[str]:
        for branch in reader.schema:
            # Consumed fully (not any()): an abandoned generator would leave `visiting` dirty.
            if not list(self.check(_Node(branch, reader.namespace), writer, path)):
                return
        yield f"{path}: writer {_describe(writer.schema)} matches no branch of the reader union"

    def _record(self, reader: _Node, writer: _Node, path: str) -> Iterator[str]:
        key = (
            _full_name(reader.schema["name"], reader.namespace),
            _full_name(writer.schema["name"], writer.namespace),
        )
        if key in self.visiting:
            return
        self.visiting.add(key)
        written = {f["name"]: f for f in writer.schema["fields"]}
        for reader_field in reader.schema["fields"]:
            names = [reader_field["name"], *reader_field.get("aliases", ())]
            match = next((written[n] for n in names if n in written), None)
            where = f"{path}.{reader_field['name']}"
            if match is None:
                if "default" not in reader_field:
                    yield f"{where}: not written and the reader has no default"
                continue
            yield from self.check(
                _Node(reader_field["type"], reader.namespace),
                _Node(match["type"], writer.namespace),
                where,
            )
        self.visiting.discard(key)


def _names_match(reader: dict[str, Any], writer: dict[str, Any]) -> bool:
    # The specification compares unqualified names; a namespace move is a house-rule matter.
    accepted = {_short(str(reader["name"])), *(_short(a) for a in reader.get("aliases", ()))}
    return _short(str(writer["name"])) in accepted


def _enum(reader: dict[str, Any], writer: dict[str, Any], path: str) -> Iterator[str]:
    missing = [s for s in writer["symbols"] if s not in reader["symbols"]]
    if missing and reader.get("default") not in reader["symbols"]:
        yield (
            f"{path}: writer symbols {missing} are not in reader enum {reader['name']}, "
            "which has no default"
        )


def check_compatible(reader: Any, writer: Any) -> list[str]:
    """Why a reader holding schema `reader` cannot read data written with `writer` (empty: it
    can). Both are schemas in their JSON form (the parsed `.avsc`)."""
    resolver = _Resolver(_Names(reader), _Names(writer))
    path = reader["name"] if isinstance(reader, dict) and "name" in reader else "(root)"
    try:
        return list(resolver.check(_Node(reader, None), _Node(writer, None), str(path)))
    except (KeyError, TypeError, ValueError) as exc:
        return [f"{path}: not a schema this checker understands: {exc!r}"]


# -- the house rules -----------------------------------------------------------------------
# `doc` is deliberately free: it is not part of the Parsing Canonical Form, so it is never
# required and never a break.


def _records(schema: Any) -> dict[str, dict[str, Any]]:
    table = _Names(schema).table
    return {name: node.schema for name, node in table.items() if node.schema["type"] == "record"}


def _naming(schema: Any, label: str) -> Iterator[str]:
    for record_name, record in _records(schema).items():
        for f in record["fields"]:
            if not _SNAKE_CASE.match(f["name"]):
                yield f"{label}: field {record_name}.{f['name']} is not snake_case"


def _changes(older: Any, newer: Any, label: str) -> Iterator[str]:
    old_name = _full_name(older["name"], older.get("namespace"))
    new_name = _full_name(newer["name"], newer.get("namespace"))
    if old_name != new_name:
        yield f"{label}: the schema was renamed from {old_name} to {new_name}"
    old_records = _records(older)
    for record_name, record in _records(newer).items():
        before = old_records.get(record_name)
        if before is None:
            continue
        old_fields = {f["name"]: f for f in before["fields"]}
        new_names = {n for f in record["fields"] for n in (f["name"], *f.get("aliases", ()))}
        for f in record["fields"]:
            if not {f["name"], *f.get("aliases", ())} & old_fields.keys() and "default" not in f:
                yield f"{label}: added field {record_name}.{f['name']} has no default"
        for name, f in old_fields.items():
            if name not in new_names and "default" not in f:
                yield f"{label}: removed field {record_name}.{name} had no default"


def check_evolution(store: SchemaStore) -> list[str]:
    """Every problem with the store's history: FULL_TRANSITIVE breaks and house-rule breaks."""
    problems: list[str] = []
    for name in store.names():
        versions = [(v.version, json.loads(v.text)) for v in store.versions(name)]
        for (rv, reader), (wv, writer) in permutations(versions, 2):
            problems += (
                f"{name} v{rv} cannot read v{wv}: {p}" for p in check_compatible(reader, writer)
            )
        for v, schema in versions:
            problems += _naming(schema, f"{name} v{v}")
        for (ov, older), (nv, newer) in pairwise(versions):
            problems += _changes(older, newer, f"{name} v{ov} -> v{nv}")
    return problems
