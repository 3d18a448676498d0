"""Erasure and retention of stored reports: `callstream erase` and `callstream purge`.

The rows go through the storage backend's own `erase` / `purge_older_than`, so one place
decides what a selector matches, and every run is recorded in the storage database's
erasure log (`consumers.storage.erasures`): when it was asked for and finished, the
selector as SHA-256 (never the number or the call id itself) and how many rows went.

After deleting, the database is compacted (SQLite: VACUUM and a WAL checkpoint, so the
erased bytes are gone from the file and not merely unlinked; PostgreSQL: VACUUM, which makes
the dead rows' space reusable). See docs/privacy.md for what this does not reach: the Kafka
topic, backups, and copies already sent out by alerting.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from consumers.storage import ErasureKind, StorageSettings, erasure_log, open_backend, sha256_hex
from core.logs import mask_phone

log = logging.getLogger(__name__)

_AGE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `3600s`, `2w` -> a positive timedelta."""
    match = _AGE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not an age such as 30d, 12h, 90m, 3600s or 2w")
    age = timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
    if age <= timedelta(0):
        raise ValueError("the age must be more than zero (zero would delete everything)")
    return age


@dataclass(frozen=True, slots=True)
class Outcome:
    entry: int  # id in the erasure log
    rows: int  # deleted from call_reports and call_events together
    compacted: bool  # False: deleted and logged, but the space is not compacted yet


async def erase(
    settings: StorageSettings, *, phone: str | None = None, call_id: str | None = None
) -> Outcome:
    """Delete the calls from `phone` and/or with `call_id` (both: calls matching both),
    recording the erasure; the backend decides what matches (see StorageBackend.erase)."""
    phone = _selector(phone, "--phone")
    call_id = _selector(call_id, "--call")
    if phone is None and call_id is None:
        raise ValueError("say whose reports to erase: --phone NUMBER, --call ID, or both")
    kind: ErasureKind = "phone+call" if phone and call_id else "phone" if phone else "call"
    async with open_backend(settings) as backend:
        erasures = erasure_log(settings)
        async with erasures.fenced():
            entry = await erasures.begin(
                kind,
                phone_sha256=None if phone is None else sha256_hex(phone),
                call_id_sha256=None if call_id is None else sha256_hex(call_id),
            )
            rows = await backend.erase(phone, call_id)
        await erasures.complete(entry, rows)
        compacted = await erasures.compact()
    log.info(
        "erased %d row(s) (reports and status updates) by %s (phone %s), erasure #%d",
        rows,
        kind,
        mask_phone(phone) if phone else "-",
        entry,
    )
    return Outcome(entry, rows, compacted)


async def purge(settings: StorageSettings, older_than: timedelta) -> Outcome:
    """Delete the calls whose event time is more than `older_than` ago, recording it."""
    async with open_backend(settings) as backend:
        erasures = erasure_log(settings)
        entry = await erasures.begin(
            "retention", older_than_seconds=int(older_than.total_seconds())
        )
        rows = await backend.purge_older_than(older_than)
        await erasures.complete(entry, rows)
        compacted = await erasures.compact() if rows else True
    log.info(
        "purged %d row(s) (reports and status updates) older than %s, erasure #%d",
        rows,
        older_than,
        entry,
    )
    return Outcome(entry, rows, compacted)


def _selector(value: str | None, option: str) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value:
        raise ValueError(f"{option} must not be empty")
    return value
