"""Sending dead-lettered alerts again (`callstream alerts retry`).

A retry sends the alert the consumer gave up on, as it was then (the privacy-safe context
kept in its `alert_dead_letters` row, with the same `alert_id`, so a webhook carries the same
id and an e-mail the same Message-ID), through the channel as the rule file configures it
now, behind the same egress guard, rate limit and retry policy as the consumer.

Each dead letter is claimed before it is sent and its outcome recorded after, as the consumer
does (consumers/alerting/state.py): a delivered one is `sent` and never retried again; a
failed one keeps its dead letter, with the retry's error, for the next retry. A retry that
was interrupted mid-send leaves its claim; the next retry takes it over once the first could
no longer be sending (its whole retry budget has passed), so two retries never send one alert
at the same time and a crash costs at most one duplicate, recognisable by its alert_id.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from prometheus_client import CollectorRegistry

from consumers.alerting.channels import AlertContext, senders_for
from consumers.alerting.delivery import AlertMetrics, Delivered, buckets_for, deliver
from consumers.alerting.egress import GuardedHttp
from consumers.alerting.rule_file import RuleSet
from consumers.alerting.settings import AlertingSettings
from consumers.alerting.state import AlertState, DeadLetter

log = logging.getLogger("callstream.alerting")

# Beyond the retry budget and one attempt's timeout, for token-bucket waits and a slow disk.
_CLAIM_MARGIN = timedelta(seconds=60)


class UnknownDeadLetter(LookupError):
    """`--id` names no dead letter in this state file."""


@dataclass(frozen=True, slots=True)
class RetryResult:
    dead_letter: DeadLetter
    outcome: Literal["sent", "failed", "skipped", "would send", "would fail"]
    detail: str  # the error, or why it was skipped; "" when sent
    attempts: int = 0


class Redelivery:
    """The state file, the rule file's channels and the egress guard, open for one command."""

    def __init__(self, settings: AlertingSettings, rules: RuleSet) -> None:
        self._settings = settings
        self._rules = rules
        self._state = AlertState(settings.state_path, busy_timeout=settings.state_busy_timeout)
        self._http = GuardedHttp(settings.network_policy)
        channels = list(rules.channels.values())
        self._senders = senders_for(channels, self._http)
        self._buckets = buckets_for(channels)
        # Nobody scrapes a command; the counters exist because `deliver` counts.
        self._metrics = AlertMetrics(CollectorRegistry())

    async def __aenter__(self) -> Redelivery:
        await self._state.open()
        await self._http.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._http.close()
        await self._state.close()

    async def retry(
        self, *, dead_letter_id: int | None, since: datetime | None, dry_run: bool
    ) -> list[RetryResult]:
        """The dead letter `dead_letter_id`, or every one not yet delivered, sent once (or,
        with `dry_run`, what would happen); one named that is delivered already is skipped."""
        if dead_letter_id is None:
            candidates = await self._state.unresolved_dead_letters(since=since)
        else:
            found = await self._state.dead_letter(dead_letter_id)
            if found is None:
                raise UnknownDeadLetter(
                    f"no dead letter #{dead_letter_id} in {self._settings.state_path}"
                )
            if found.resolved_at is not None:
                done = f"already delivered by a retry at {found.resolved_at}"
                return [RetryResult(found, "skipped", done)]
            candidates = [found]
        return [await self._one(dead_letter, dry_run=dry_run) for dead_letter in candidates]

    def _problem(self, dead_letter: DeadLetter) -> str | None:
        if dead_letter.context is None:
            return "dead-lettered by a release that did not keep the alert's text; cannot resend"
        if dead_letter.key.channel not in self._rules.channels:
            return (
                f"channel {dead_letter.key.channel!r} is no longer in the rule file"
                f" {self._settings.rules_path}"
            )
        return None

    async def _one(self, dead_letter: DeadLetter, *, dry_run: bool) -> RetryResult:
        problem = self._problem(dead_letter)
        if dry_run:
            return RetryResult(
                dead_letter, "would fail" if problem else "would send", problem or ""
            )
        if problem is not None:
            await self._state.retry_failed(dead_letter, problem, 0)
            return RetryResult(dead_letter, "failed", problem)
        policy = self._settings.retry
        stale_before = (
            datetime.now(UTC) - timedelta(seconds=policy.budget + policy.timeout) - _CLAIM_MARGIN
        )
        if not await self._state.claim_retry(dead_letter.id, stale_before=stale_before):
            return RetryResult(
                dead_letter, "skipped", "another retry is sending it, or has just sent it"
            )
        context: AlertContext | None = dead_letter.context
        assert context is not None  # _problem said so
        key = dead_letter.key
        outcome = await deliver(
            self._senders[key.channel], context, self._buckets[key.channel], policy, self._metrics
        )
        where = {"rule": key.rule, "channel": key.channel, "call_id": key.call_id}
        if isinstance(outcome, Delivered):
            await self._state.retry_delivered(dead_letter, outcome.attempts)
            log.info(
                "dead-lettered alert sent again", extra={**where, "dead_letter": dead_letter.id}
            )
            return RetryResult(dead_letter, "sent", "", outcome.attempts)
        error = f"{outcome.reason}: {outcome.detail}"
        await self._state.retry_failed(dead_letter, error, outcome.attempts)
        log.warning(
            "dead-lettered alert failed again",
            extra={**where, "dead_letter": dead_letter.id, "reason": outcome.reason},
        )
        return RetryResult(dead_letter, "failed", error, outcome.attempts)


def failed(results: Sequence[RetryResult]) -> bool:
    return any(result.outcome == "failed" for result in results)
