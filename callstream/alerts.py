"""`callstream alerts list` and `callstream alerts retry`: what the alerting consumer sent or
gave up on, read from its state file (CALLSTREAM_ALERT_STATE_PATH), and sending what it
gave up on again through the rule file's channels (consumers/alerting/redelivery.py).

Both read the same settings as the alerting consumer, so run them with its environment.
Their own errors (no state file, an unknown dead letter, a bad --since) are one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson

from callstream.clihelp import table
from callstream.replayplan import parse_time
from consumers.alerting import AlertingSettings, load_rule_file
from consumers.alerting.redelivery import Redelivery, RetryResult, UnknownDeadLetter, failed
from consumers.alerting.state import AlertRecord, AlertState, StateUnavailable


class _CommandError(Exception):
    """One line for the operator; exit code 2."""


def _settings(
    args: argparse.Namespace, env: Mapping[str, str]
) -> tuple[AlertingSettings, datetime | None]:
    """The settings and --since, once the state file they name is known to exist; a bad
    --since or a missing file is a _CommandError."""
    settings = AlertingSettings.from_env(env)
    since = None
    if args.since is not None:
        try:
            since = parse_time(args.since)
        except ValueError:
            raise _CommandError(
                f"--since {args.since!r}: give an ISO time (2026-12-01T09:00Z) or an age back"
                " from now (-90m, -2h, -7d)"
            ) from None
    # Opening would create an empty file: a wrong path must say so instead of listing nothing.
    if not settings.state_path.is_file():
        raise _CommandError(
            f"no alert state file at {settings.state_path} (CALLSTREAM_ALERT_STATE_PATH):"
            " run this with the alerting consumer's settings"
        )
    return settings, since


def _fail(command: str, exc: Exception) -> int:
    message = " ".join(str(exc).split())
    print(f"callstream alerts {command}: {message}", file=sys.stderr)
    return 2


def list_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    try:
        settings, since = _settings(args, env)
        state = AlertState(settings.state_path, busy_timeout=settings.state_busy_timeout)
        records = asyncio.run(history(state, since, failed_only=args.failed))
    except (_CommandError, StateUnavailable) as exc:
        return _fail("list", exc)
    if args.json:
        for record in records:
            sys.stdout.write(orjson.dumps(record_json(record)).decode() + "\n")
        return 0
    if not records:
        print("no failed alerts" if args.failed else "no alerts")
        return 0
    header = ["UPDATED", "STATUS", "DEAD", "RULE", "CHANNEL", "CALL", "ATTEMPTS", "ERROR"]
    print("\n".join(table([header, *map(_row, records)])))
    return 0


async def history(
    state: AlertState, since: datetime | None, *, failed_only: bool
) -> list[AlertRecord]:
    """What the state file holds; closed again even when opening it failed."""
    try:
        await state.open()
        return await state.history(since=since, failed_only=failed_only)
    finally:
        await state.close()


def record_json(record: AlertRecord) -> dict[str, Any]:
    """One (rule, call, channel) for `--json`."""
    dead_letter = record.dead_letter
    return {
        "rule": record.key.rule,
        "channel": record.key.channel,
        "call_id": record.key.call_id,
        "status": record.status,
        "error": None if dead_letter is None or record.status == "sent" else dead_letter.error,
        "attempts": record.attempts,
        "claims": record.claims,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "dead_letter_id": None if dead_letter is None else dead_letter.id,
        "channel_type": None if dead_letter is None else dead_letter.channel_type,
        "retries": 0 if dead_letter is None else dead_letter.retries,
        "retried_at": None if dead_letter is None else dead_letter.retried_at,
    }


def _row(record: AlertRecord) -> list[str]:
    fields = record_json(record)
    dead_letter = fields["dead_letter_id"]
    return [
        fields["updated_at"],
        fields["status"],
        "" if dead_letter is None else f"#{dead_letter}",
        record.key.rule,
        record.key.channel,
        record.key.call_id,
        str(fields["attempts"]),
        fields["error"] or "",
    ]


def retry_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    try:
        settings, since = _settings(args, env)
        if settings.rules_path is None:
            raise _CommandError(
                "CALLSTREAM_ALERT_RULES is not set: a retry sends through the rule file's channels"
            )
        rules = load_rule_file(settings.rules_path, env)
        results = asyncio.run(_retry(Redelivery(settings, rules), args, since))
    except (_CommandError, StateUnavailable, UnknownDeadLetter) as exc:
        return _fail("retry", exc)
    for result in results:
        print(_result_line(result))
    print(_summary(results, dry_run=args.dry_run))
    return 1 if failed(results) else 0


async def _retry(
    redelivery: Redelivery, args: argparse.Namespace, since: datetime | None
) -> list[RetryResult]:
    async with redelivery:
        return await redelivery.retry(dead_letter_id=args.id, since=since, dry_run=args.dry_run)


def _result_line(result: RetryResult) -> str:
    key = result.dead_letter.key
    line = (
        f"{result.outcome:<10}  #{result.dead_letter.id} rule={key.rule} channel={key.channel}"
        f" call={key.call_id}"
    )
    if result.outcome == "sent":
        return f"{line} ({result.attempts} attempt(s))"
    return f"{line}: {result.detail}" if result.detail else line


def _summary(results: Sequence[RetryResult], *, dry_run: bool) -> str:
    if not results:
        return "nothing to retry"
    counts = Counter(result.outcome for result in results)
    told = ", ".join(f"{count} {outcome}" for outcome, count in counts.items())
    return f"dry run, nothing sent: {told}" if dry_run else told
