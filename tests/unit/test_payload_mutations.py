"""Every real payload, with each of its values in turn replaced by an odd one (or removed):
`normalise` answers with a record that encodes to Avro and back, or with an `InvalidReport`
(a 4xx). Anything else would be a 500, and Flireo does not send a refused report again.

The generated properties (test_normalise_properties.py) draw from the same space at random
and missed a list in `message.type`; walking every place of every payload the senders
document does not miss a place.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from schemas.errors import InvalidReport
from schemas.normalise import normalise
from tests.support.avro import through_avro
from tests.support.paths import DATA
from tests.support.samples import SAMPLE

PAYLOADS = sorted(
    [
        *(DATA / "payloads").glob("*.json"),
        DATA / "nested-camel.json",
        DATA / "nested-snake.json",
        DATA / "status-update.json",
        SAMPLE,
    ]
)
PAYLOADS.remove(DATA / "payloads" / "expected-reports.json")
# Each kind of value a sender's bug (or a new field's shape) could put anywhere.
ODD_VALUES: tuple[Any, ...] = (
    None,
    True,
    0,
    -1,
    1.5,
    -0.0,
    1e308,
    2**63 - 1,
    -(2**63),
    "",
    "x" * 70_000,
    "\u0000",
    "\U0001f600",
    "not-a-date",
    "2026-13-45T99:99:99Z",
    "9999-12-31T23:59:59Z",
    "0001-01-01T00:00:00Z",
    "end-of-call-report",
    "status-update",
    "assistant-request",
    253_402_300_800_000,
    -62_135_596_800_001,
    [],
    {},
    [[]],
    [{}],
    [None],
    [1, "a"],
    {"": 1},
    {"a": {}},
    ["end-of-call-report"],
    {"type": "end-of-call-report"},
)
_REMOVED = object()
_RECEIVED_AT_MS = 1_765_000_000_000


def _places(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _places(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _places(child, (*path, index))


def _changed(payload: Any, path: tuple[str | int, ...], value: Any) -> Any:
    if not path:
        return copy.deepcopy(value)
    out = copy.deepcopy(payload)
    parent = out
    for part in path[:-1]:
        parent = parent[part]
    if value is _REMOVED:
        del parent[path[-1]]
    else:
        parent[path[-1]] = copy.deepcopy(value)
    return out


def _failure(payload: Any) -> str | None:
    """None when the payload is refused with an InvalidReport or round-trips through Avro."""
    try:
        result = normalise(payload, received_at_ms=_RECEIVED_AT_MS, request_id="0" * 32)
    except InvalidReport:
        return None
    except Exception as exc:
        return f"normalise raised {exc!r}"
    try:
        through_avro(result.record, result.schema_name)
    except Exception as exc:
        return f"{result.schema_name} does not round-trip through Avro: {exc!r}"
    return None


@pytest.mark.parametrize("path", PAYLOADS, ids=[path.name for path in PAYLOADS])
def test_an_odd_value_anywhere_is_accepted_whole_or_refused_with_a_4xx(path: Path) -> None:
    payload = orjson.loads(path.read_bytes())
    failures = []
    for place in _places(payload):
        for value in (*ODD_VALUES, *((_REMOVED,) if place else ())):
            failure = _failure(_changed(payload, place, value))
            if failure is not None:
                shown = "removed" if value is _REMOVED else repr(value)[:40]
                failures.append(f"/{'/'.join(map(str, place))} = {shown}: {failure}")
    assert not failures, "\n".join(failures[:20])
