"""The value converters every format's field table shares: (raw value, pointer) -> canonical
value, each raising InvalidReport naming the field, and the renderers that turn a canonical
value back into what a sender would have written.

Kept apart from the tables (schemas/fieldmaps.py) so that a new format adds paths, not
another copy of how an ISO time or a duration is read.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from schemas import jsonvalue
from schemas.errors import InvalidReport

Converter = Callable[[Any, str], Any]
Renderer = Callable[[Any], Any]

_EVENT_TYPE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_CALL_ID_LENGTH = 256
# Sanity window for event times: 2000-01-01 .. 2100-01-01 in epoch milliseconds (the
# OpenAPI document states the same bounds).
MIN_EVENT_TIME_MS, MAX_EVENT_TIME_MS = 946_684_800_000, 4_102_444_800_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MISSING: Any = object()


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def string(value: Any, pointer: str) -> str:
    if not isinstance(value, str):
        raise InvalidReport(pointer, f"must be a string, not {json_type(value)}")
    return value


def call_id(value: Any, pointer: str) -> str:
    text = string(value, pointer)
    if not text.strip():
        raise InvalidReport(pointer, "must not be empty")
    if len(text) > MAX_CALL_ID_LENGTH:
        raise InvalidReport(pointer, f"longer than {MAX_CALL_ID_LENGTH} characters")
    return text


def event_type(value: Any, pointer: str) -> str:
    text = string(value, pointer)
    if not _EVENT_TYPE.match(text):
        raise InvalidReport(pointer, "must be a lower-case event name such as end-of-call-report")
    return text


def epoch_ms(value: Any, pointer: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidReport(
            pointer, f"must be an integer of epoch milliseconds, not {json_type(value)}"
        )
    if not MIN_EVENT_TIME_MS <= value < MAX_EVENT_TIME_MS:
        raise InvalidReport(pointer, "epoch milliseconds outside 2000..2100")
    return value


def timestamp(value: Any, pointer: str) -> int:
    """An ISO-8601 string with a zone; epoch milliseconds are accepted too (Vapi sends a
    number since 2025-04 and sent a string before)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return epoch_ms(value, pointer)
    text = string(value, pointer)
    try:
        # RFC 3339 allows a lower-case t and z; the original spelling survives in extra_json.
        parsed = datetime.fromisoformat(text.upper())
    except ValueError:
        raise InvalidReport(pointer, "must be an ISO-8601 timestamp") from None
    if parsed.tzinfo is None:
        raise InvalidReport(pointer, "timestamp must carry a zone (Z or +hh:mm)")
    return epoch_ms(round(parsed.timestamp() * 1000), pointer)


def render_iso(ms: int) -> str:
    return f"{datetime.fromtimestamp(ms / 1000, tz=UTC):%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def number(value: Any, pointer: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidReport(pointer, f"must be a number, not {json_type(value)}")
    if value < 0:
        raise InvalidReport(pointer, "must not be negative")
    return value


def scalar(value: Any, pointer: str) -> bool | int | float | str:
    if not isinstance(value, bool | int | float | str):
        raise InvalidReport(pointer, f"must be a string, number or boolean, not {json_type(value)}")
    return value


def object_json(value: Any, pointer: str) -> str:
    if not isinstance(value, dict):
        raise InvalidReport(pointer, f"must be an object, not {json_type(value)}")
    return orjson.dumps(value).decode()


def array_json(value: Any, pointer: str) -> str:
    if not isinstance(value, list):
        raise InvalidReport(pointer, f"must be an array, not {json_type(value)}")
    return orjson.dumps(value).decode()


def same(value: Any) -> Any:
    return value


def pointer(path: tuple[str, ...]) -> str:
    return "".join("/" + jsonvalue.escape(part) for part in path)


@dataclass(frozen=True, slots=True)
class Field:
    """One typed field of one format: where it sits, how it is read and written back.

    `fallbacks` are other places the same fact is documented to sit (Vapi repeats
    `endedReason` inside `call`); one is read only when `path` is absent, and a value read
    from a fallback is never written back (the original stays in extra_json)."""

    path: tuple[str, ...]
    name: str
    convert: Converter
    render: Renderer = same
    required: bool = False
    pointer: str = ""  # the JSON pointer of `path`, built once
    fallbacks: tuple[tuple[str, ...], ...] = ()


# What each converter's value is written back as; any other is written back as it is.
_RENDERERS: dict[Converter, Renderer] = {
    timestamp: render_iso,
    object_json: orjson.loads,
    array_json: orjson.loads,
}
_REQUIRED = ("event_type", "call_id")


def fields(
    *spec: tuple[tuple[str, ...], str, Converter, *tuple[tuple[str, ...], ...]],
) -> tuple[Field, ...]:
    """A format's table from rows of (path, name, converter, fallback paths...)."""
    return tuple(
        Field(
            path,
            name,
            convert,
            _RENDERERS.get(convert, same),
            name in _REQUIRED,
            pointer(path),
            tuple(fallbacks),
        )
        for path, name, convert, *fallbacks in spec
    )


def lookup(payload: Any, path: tuple[str, ...]) -> Any:
    """The value at `path`, MISSING when any step is absent or null; a step that is neither
    an object nor null is a contract break, named by its pointer."""
    node: Any = payload
    for depth, part in enumerate(path):
        if not isinstance(node, dict):
            if node is None:
                return MISSING
            raise InvalidReport(pointer(path[:depth]), f"must be an object, not {json_type(node)}")
        node = node.get(part, MISSING)
        if node is MISSING:
            return MISSING
    return node


def peek(payload: Any, path: tuple[str, ...]) -> Any:
    """`lookup` for places nothing is promised about: a wrong shape is just absent."""
    try:
        return lookup(payload, path)
    except InvalidReport:
        return MISSING
