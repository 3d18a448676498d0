"""Strict JSON for webhook bodies: parse, bound, compare, merge.

orjson already refuses NaN/Infinity literals, invalid UTF-8 and lone surrogates, but it
silently turns an integer literal wider than 64 bits into a float, which would change the
value a sender meant. Bodies where orjson produced a float that large (|x| >= 2**63) are
re-parsed with the standard library, which keeps integers exact so they can be refused.

orjson also keeps the last of a key written twice in one object, where another parser
reading the same signed bytes may keep the first: such a body is refused, naming the key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import orjson

from schemas.errors import InvalidReport

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# orjson reads an integer literal outside [-2**63, 2**64) as a float at least this large.
_INTEGER_SIZED_FLOAT = float(2**63)
_OK, _HUGE_FLOAT, _OUT_OF_BOUNDS = 0, 1, 2
_LONG_DIGIT_RUN = re.compile(rb"[0-9]{19,}")
_SPACE_BEFORE_COLON = re.compile(rb'"[ \t\r\n]+:')


def parse(body: bytes, *, max_depth: int) -> Any:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidReport("", f"body is not valid JSON: {exc}") from exc
    verdict, keys = _scan(value, max_depth)
    if verdict == _HUGE_FLOAT:
        # It may have been an integer literal wider than 64 bits: read it exactly.
        value = _parse_exact(body)
        verdict, keys = _scan(value, max_depth)
        verdict = _OK if verdict == _HUGE_FLOAT else verdict
    elif verdict == _OUT_OF_BOUNDS and _LONG_DIGIT_RUN.search(body):
        # Refused either way; read exactly so the error names the same place as ever.
        value = _parse_exact(body)
    if verdict != _OK:
        check_bounds(value, max_depth)  # raises, naming where
    if _may_repeat_a_key(body, keys):
        _refuse_repeated_keys(body)
    return value


def _may_repeat_a_key(body: bytes, parsed_keys: int) -> bool:
    """False only when no object of `body` can have a key twice: a repeat parses into fewer
    keys than the text holds. Each key in the text closes right before its colon (unless
    white space sits between), so it owns one '":' of the body; as many '":' as parsed keys
    leaves no room for a repeat. A '\\":' inside a string only errs towards looking."""
    return body.count(b'":') != parsed_keys or _SPACE_BEFORE_COLON.search(body) is not None


class _Repeated(dict[str, Any]):
    """Stands in the parsed tree for an object that holds `key` twice: the parser's hook
    sees an object's pairs but not where the object is, so the walk after it says where."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key


def _refuse_repeated_keys(body: bytes) -> None:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, item in items:
            if key in seen:
                return _Repeated(key)
            seen[key] = item
        return seen

    # Depth first, children in document order: the first repeat in the text is named.
    stack: list[tuple[Any, str]] = [(_parse_exact(body, pairs), "")]
    while stack:
        node, pointer = stack.pop()
        if isinstance(node, _Repeated):
            where = f"{pointer}/{escape(node.key)}"
            raise InvalidReport(where, f"the key {node.key!r} appears twice in one object")
        if isinstance(node, dict | list):
            entries = node.items() if isinstance(node, dict) else enumerate(node)
            children = [(child, f"{pointer}/{escape(str(key))}") for key, child in entries]
            stack.extend(reversed(children))


def _scan(value: Any, max_depth: int) -> tuple[int, int]:
    """check_bounds without building a pointer per node (it only matters for the error),
    also saying whether a float large enough to have been a wide integer was seen, and how
    many keys all objects hold."""
    huge = False
    keys = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        kind = type(node)
        if kind is dict:
            keys += len(node)
            children: Any = node.values()
        elif kind is list:
            children = node
        else:
            if kind is int and not INT64_MIN <= node <= INT64_MAX:
                return _OUT_OF_BOUNDS, keys
            if kind is float and not -_INTEGER_SIZED_FLOAT < node < _INTEGER_SIZED_FLOAT:
                huge = True
            continue
        if depth >= max_depth:
            return _OUT_OF_BOUNDS, keys
        for child in children:
            kind = type(child)
            if kind is dict or kind is list:
                stack.append((child, depth + 1))
            elif kind is int:
                if not INT64_MIN <= child <= INT64_MAX:
                    return _OUT_OF_BOUNDS, keys
            elif kind is float and not -_INTEGER_SIZED_FLOAT < child < _INTEGER_SIZED_FLOAT:
                huge = True
    return (_HUGE_FLOAT if huge else _OK), keys


def _reject_constant(name: str) -> Any:
    raise InvalidReport("", f"{name} is not a JSON number")


def _parse_exact(body: bytes, pairs: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    try:
        return json.loads(body, object_pairs_hook=pairs, parse_constant=_reject_constant)
    except InvalidReport:
        raise  # a ValueError too, but already in its own words
    except (ValueError, RecursionError) as exc:
        raise InvalidReport("", f"body is not valid JSON: {exc}") from exc


def check_bounds(value: Any, max_depth: int) -> None:
    """Refuse nesting deeper than `max_depth` and integers outside Avro's long."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        node, pointer, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth >= max_depth:
                raise InvalidReport(pointer, f"nesting deeper than {max_depth} levels")
            entries = node.items() if isinstance(node, dict) else enumerate(node)
            for key, child in entries:
                if isinstance(child, dict | list | int) and not isinstance(child, bool):
                    stack.append((child, f"{pointer}/{escape(str(key))}", depth + 1))
        elif type(node) is int and not INT64_MIN <= node <= INT64_MAX:
            # Only integers reach here below the root, but the root itself may be any scalar.
            raise InvalidReport(pointer, "integer outside the signed 64-bit range")


def escape(key: str) -> str:
    """One RFC 6901 reference token."""
    return key.replace("~", "~0").replace("/", "~1")


def same(a: Any, b: Any) -> bool:
    """JSON equality that also tells 1 from 1.0 from true."""
    if a is b:
        return True  # the normalisers pass strings through as they are
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def difference(raw: dict[str, Any], rebuilt: dict[str, Any]) -> dict[str, Any]:
    """What must be laid over `rebuilt` (with `merge`) to get `raw` back exactly.

    Only sound when every key of `rebuilt` is also in `raw`, which the normalisers ensure by
    emitting a field only where the input had it.
    """
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in rebuilt:
            out[key] = value
            continue
        other = rebuilt[key]
        if isinstance(value, dict) and isinstance(other, dict):
            nested = difference(value, other)
            if nested:
                out[key] = nested
        elif not same(value, other):
            out[key] = value
    return out


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Lay `overlay` over `base` (a new dict); objects merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in overlay.items():
        current = out.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            out[key] = merge(current, value)
        else:
            out[key] = value
    return out
