"""The strict JSON reader on its own: a key written twice in any object is refused, and a
body without one reads exactly as orjson reads it, however it is spaced or escaped."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import jsonvalue
from schemas.errors import InvalidReport
from tests.support.jsontree import objects

_keys = st.text(alphabet=st.sampled_from('ab"\\: \t'), min_size=0, max_size=4)
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), _keys)
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(_keys, children, max_size=4)
    ),
    max_leaves=20,
)
_layouts: st.SearchStrategy[dict[str, Any]] = st.sampled_from(
    [{}, {"indent": 1}, {"separators": (" , ", " : ")}]
)


@given(value=st.dictionaries(_keys, _values, max_size=5), layout=_layouts)
def test_a_body_without_repeated_keys_reads_as_orjson_reads_it(
    value: dict[str, Any], layout: dict[str, Any]
) -> None:
    body = json.dumps(value, **layout).encode()
    assert jsonvalue.parse(body, max_depth=64) == orjson.loads(body)


@given(value=st.dictionaries(_keys, _values, min_size=1, max_size=5), data=st.data())
def test_a_key_repeated_in_any_object_is_refused(
    value: dict[str, Any], data: st.DataObject
) -> None:
    target = data.draw(st.sampled_from([o for o in objects(value) if o]))
    key = data.draw(st.sampled_from(sorted(target)))
    layout = data.draw(_layouts)
    marker = "\x00repeat\x00"
    target[marker] = None
    # The marker entry is written as the chosen key a second time.
    body = (
        json.dumps(value, **layout)
        .encode()
        .replace(json.dumps(marker).encode(), json.dumps(key).encode())
    )
    with pytest.raises(InvalidReport, match="appears twice"):
        jsonvalue.parse(body, max_depth=64)


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        (b'{"a":1,"a":2}', "/a"),
        (b'{"x":{"call":1, "call" :2},"y":1e300}', "/x/call"),
        (b'{"m":[{},{"a/b~":1,"a/b~":2}],"n":{"k":1,"k":2}}', "/m/1/a~1b~0"),
    ],
)
def test_a_repeated_key_is_refused_in_its_own_words_naming_where(body: bytes, pointer: str) -> None:
    """The first repeat in the document is named by its pointer, not wrapped as invalid JSON."""
    with pytest.raises(InvalidReport) as refused:
        jsonvalue.parse(body, max_depth=64)
    key = json.loads(f'"{pointer.rsplit("/", 1)[1]}"').replace("~1", "/").replace("~0", "~")
    assert refused.value.pointer == pointer
    assert refused.value.detail == f"the key {key!r} appears twice in one object"
