"""A record through the Avro codec and back, as the ingress writes and a consumer reads it."""

from __future__ import annotations

from typing import Any

from schemas.codec import Decoder, single_object_encoder
from schemas.store import END_OF_CALL_REPORT, default_store


def through_avro(record: dict[str, Any], name: str = END_OF_CALL_REPORT) -> dict[str, Any]:
    store = default_store()
    wire = single_object_encoder(store.current(name)).encode(record)
    decoded = Decoder(store).decode_local(wire)
    assert decoded.name == name
    return decoded.record
