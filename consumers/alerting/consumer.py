"""alerting: notify Slack, signed webhooks and e-mail when a call matches a rule.

Rules and channels live in one YAML file (`CALLSTREAM_ALERT_RULES`, see
examples/alert-rules.yaml and consumers/alerting/conditions.py for the condition language). For
every report in a batch each matching rule notifies each of its channels exactly once per
call: a SQLite file (`CALLSTREAM_ALERT_STATE_PATH`) records what was sent, so redelivery
and replays stay quiet (the one crash window is described in consumers/alerting/state.py).

Alerts of a batch are sent concurrently, each channel behind its own token bucket. An
alert a channel keeps refusing is dead-lettered (a row in `alert_dead_letters`, keeping what
the alert said) without holding up other channels or rules; `callstream alerts retry` sends
it again later (consumers/alerting/redelivery.py). `handle` returns when every alert of the
batch is sent or dead-lettered; it raises RetryableError only when the state database is
unavailable.

Messages never carry a full phone number, the recording URL, or any URL at all; summary
and transcript excerpt are cut short.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from consumers.alerting.channels import AlertContext, senders_for
from consumers.alerting.delivery import AlertMetrics, Delivered, Undeliverable, buckets_for, deliver
from consumers.alerting.egress import GuardedHttp
from consumers.alerting.message import build_context
from consumers.alerting.rule_file import Rule, RuleSet, load_rule_file
from consumers.alerting.settings import AlertingSettings
from consumers.alerting.state import AlertKey, AlertState, StateUnavailable
from consumers.contract import Consumer, Delivery
from consumers.errors import RetryableError
from schemas.report import CallReport

log = logging.getLogger("callstream.alerting")


@dataclass(frozen=True, slots=True)
class _Planned:
    key: AlertKey
    rule: Rule
    report: CallReport


class AlertingConsumer(Consumer):
    name = "alerting"

    def __init__(
        self, settings: AlertingSettings, rules: RuleSet, registry: CollectorRegistry
    ) -> None:
        self.settings = settings
        self.rules = rules
        self._metrics = AlertMetrics(registry)
        self._state = AlertState(settings.state_path, busy_timeout=settings.state_busy_timeout)
        self._http = GuardedHttp(settings.network_policy)
        channels = list(rules.channels.values())
        self._senders = senders_for(channels, self._http)
        self._buckets = buckets_for(channels)
        # Outcomes that happened but could not be written (state DB failed afterwards):
        # written first on the next call, so the redelivered batch does not re-send them.
        self._unrecorded: dict[AlertKey, tuple[Delivered | Undeliverable, AlertContext]] = {}

    async def start(self) -> None:
        await self._state.open()
        await self._http.start()
        if self.settings.rules_path is None:
            log.warning("CALLSTREAM_ALERT_RULES is not set: no rules, no alerts will be sent")
        elif not self.rules.rules:
            log.warning(
                "the rule file has no enabled rules: no alerts will be sent",
                extra={"rules_path": str(self.settings.rules_path)},
            )
        else:
            log.info(
                "alerting rules loaded",
                extra={"rules": len(self.rules.rules), "channels": len(self.rules.channels)},
            )

    async def stop(self) -> None:
        await self._http.close()
        await self._state.close()

    async def handle(self, batch: Sequence[Delivery]) -> None:
        planned: dict[AlertKey, _Planned] = {}
        for delivery in batch:
            report = delivery.report
            for rule in self.rules.matching(report):
                for channel in rule.channels:
                    key = AlertKey(rule.name, report.call_id, channel)
                    if key in planned:  # the same call twice in one batch
                        self._metrics.suppressed_duplicates.inc()
                        continue
                    planned[key] = _Planned(key, rule, report)
        if not planned:
            return
        try:
            await self._write_unrecorded()
            claims = await self._state.claim(list(planned))
        except StateUnavailable as exc:
            raise RetryableError(f"alert state unavailable: {exc}") from exc

        # Channels go concurrently, but each channel sends one alert at a time and records it
        # before the next: a crash can then repeat at most one alert per channel.
        by_channel: dict[str, list[_Planned]] = {}
        for key, status in claims.items():
            if status == "done":
                self._metrics.suppressed_duplicates.inc()
                continue
            if status == "resend":
                log.warning(
                    "re-sending an alert whose earlier attempt was interrupted",
                    extra={"rule": key.rule, "channel": key.channel, "call_id": key.call_id},
                )
            by_channel.setdefault(key.channel, []).append(planned[key])
        results = await asyncio.gather(
            *(self._send_in_turn(items) for items in by_channel.values()), return_exceptions=True
        )
        state_errors = [r for r in results if isinstance(r, StateUnavailable)]
        others = [r for r in results if isinstance(r, BaseException) and r not in state_errors]
        if others:
            raise others[0]
        if state_errors:
            raise RetryableError(f"alert state unavailable: {state_errors[0]}") from state_errors[0]

    async def _send_in_turn(self, items: list[_Planned]) -> None:
        for item in items:
            await self._send(item)

    async def _send(self, item: _Planned) -> None:
        key = item.key
        sender = self._senders[key.channel]
        context = build_context(
            key,
            item.rule,
            item.report,
            excerpt_chars=self.settings.excerpt_chars,
            summary_chars=self.settings.summary_chars,
        )
        outcome = await deliver(
            sender, context, self._buckets[key.channel], self.settings.retry, self._metrics
        )
        if isinstance(outcome, Undeliverable):
            self._metrics.dead_lettered.labels(sender.channel.type).inc()
            log.warning(
                "alert dead-lettered",
                extra={
                    "rule": key.rule,
                    "channel": key.channel,
                    "channel_type": sender.channel.type,
                    "call_id": key.call_id,
                    "reason": outcome.reason,
                    "detail": outcome.detail,
                    "attempts": outcome.attempts,
                },
            )
        try:
            await self._record(key, outcome, context)
        except StateUnavailable:
            self._unrecorded[key] = (outcome, context)
            raise

    async def _record(
        self, key: AlertKey, outcome: Delivered | Undeliverable, context: AlertContext
    ) -> None:
        if isinstance(outcome, Delivered):
            await self._state.mark_sent(key, outcome.attempts)
        else:
            await self._state.mark_dead_lettered(
                key,
                channel_type=self._senders[key.channel].channel.type,
                reason=outcome.reason,
                detail=outcome.detail,
                attempts=outcome.attempts,
                context=context,  # what `callstream alerts retry` sends again
            )

    async def _write_unrecorded(self) -> None:
        for key, (outcome, context) in list(self._unrecorded.items()):
            await self._record(key, outcome, context)
            del self._unrecorded[key]


def build(env: Mapping[str, str], registry: CollectorRegistry) -> AlertingConsumer:
    """Settings and rules are read and validated here, so a bad file stops the start-up."""
    settings = AlertingSettings.from_env(env)
    rules = RuleSet() if settings.rules_path is None else load_rule_file(settings.rules_path, env)
    return AlertingConsumer(settings, rules, registry)
