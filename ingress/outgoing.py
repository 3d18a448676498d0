"""A record on its way to Kafka, and its encoding as a spool payload: exactly what the
direct path would have sent, so the drainer publishes the same bytes."""

from __future__ import annotations

import struct
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OutgoingRecord:
    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


_RECORD_VERSION = 1
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")


def encode_record(record: OutgoingRecord) -> bytes:
    """version u8 | topic (u16 len) | key (i32 len, -1 = none) | value (u32 len) |
    header count u16 | per header: name (u16 len), value (u32 len)"""
    topic = record.topic.encode()
    parts = [_U8.pack(_RECORD_VERSION), _U16.pack(len(topic)), topic]
    if record.key is None:
        parts.append(_I32.pack(-1))
    else:
        parts += [_I32.pack(len(record.key)), record.key]
    parts += [_U32.pack(len(record.value)), record.value, _U16.pack(len(record.headers))]
    for name, value in record.headers:
        raw_name = name.encode()
        parts += [_U16.pack(len(raw_name)), raw_name, _U32.pack(len(value)), value]
    return b"".join(parts)


def decode_record(data: bytes) -> OutgoingRecord:
    view = memoryview(data)
    pos = 0

    def take(size: int) -> bytes:
        nonlocal pos
        if pos + size > len(view):
            raise ValueError("spooled record is truncated")
        chunk = bytes(view[pos : pos + size])
        pos += size
        return chunk

    def unpack(fmt: struct.Struct) -> int:
        return int(fmt.unpack(take(fmt.size))[0])

    version = unpack(_U8)
    if version != _RECORD_VERSION:
        raise ValueError(f"spooled record has unknown version {version}")
    topic = take(unpack(_U16)).decode()
    key_length = unpack(_I32)
    key = None if key_length < 0 else take(key_length)
    value = take(unpack(_U32))
    headers = tuple((take(unpack(_U16)).decode(), take(unpack(_U32))) for _ in range(unpack(_U16)))
    if pos != len(view):
        raise ValueError("spooled record has trailing bytes")
    return OutgoingRecord(topic=topic, key=key, value=value, headers=headers)
