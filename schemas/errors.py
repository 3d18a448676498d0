"""Errors raised by the contract: decoding, schema resolution and input validation."""

from __future__ import annotations


class SchemaError(Exception):
    """A schema file is missing, malformed, or breaks the evolution rules."""


class DecodeError(Exception):
    """Bytes on the topic are not a record any known schema can read (a poison message)."""


class UnknownSchemaError(DecodeError):
    """The record names a schema (fingerprint or registry id) this process cannot resolve."""


class InvalidReport(ValueError):
    """A webhook payload breaks the contract.

    `pointer` is an RFC 6901 JSON pointer to the offending field, so the 4xx body can
    name exactly what to fix.
    """

    def __init__(self, pointer: str, detail: str) -> None:
        super().__init__(f"{pointer or '/'}: {detail}")
        self.pointer = pointer
        self.detail = detail
