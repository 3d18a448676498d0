"""alerting: notify Slack, signed webhooks and e-mail when a call matches a rule.

Rules and channels live in one YAML file (`CALLSTREAM_ALERT_RULES`, see
examples/alert-rules.yaml and consumers/alert_rules.py for the condition language). For
every report in a batch each matching rule notifies each of its channels exactly once per
call: a SQLite file (`CALLSTREAM_ALERT_STATE_PATH`) records what was sent, so redelivery
and replays stay quiet (the one crash window is described in consumers/alert_state.py).

Alerts of a batch are sent concurrently, each channel behind its own token bucket. An
alert a channel keeps refusing is dead-lettered (a row in `alert_dead_letters`) without
holding up other channels or rules. `handle` returns when every alert of the batch is sent
or dead-lettered; it raises RetryableError only when the state database is unavailable.

Messages never carry a full phone number, the recording URL, or any URL at all; summary
and transcript excerpt are cut short.

Environment (defaults in brackets):
  CALLSTREAM_ALERT_RULES                       rule file [none: no rules, nothing alerts]
  CALLSTREAM_ALERT_STATE_PATH                  [.callstream/alerting.db]
  CALLSTREAM_ALERT_ALLOWED_NETWORKS            CIDRs webhooks may reach despite being
                                               private/loopback/... [none]
  CALLSTREAM_ALERT_TIMEOUT_SECONDS             one delivery attempt [10]
  CALLSTREAM_ALERT_MAX_ATTEMPTS                per alert [5]
  CALLSTREAM_ALERT_RETRY_BUDGET_SECONDS        first attempt to last retry [120]
  CALLSTREAM_ALERT_BACKOFF_SECONDS             first backoff, doubling [1]
  CALLSTREAM_ALERT_BACKOFF_MAX_SECONDS         [30]
  CALLSTREAM_ALERT_EXCERPT_CHARS               transcript excerpt length [280]
  CALLSTREAM_ALERT_SUMMARY_CHARS               summary length [600]
  CALLSTREAM_ALERT_STATE_BUSY_TIMEOUT_SECONDS  wait for a locked state file [5]
Secrets (webhook signing keys, Slack URLs, SMTP passwords) are read from the variables the
rule file names.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson
from prometheus_client import CollectorRegistry

from consumers.alert_channels import (
    AlertContext,
    AlertMetrics,
    Delivered,
    GuardedHttp,
    NetworkPolicy,
    RetryPolicy,
    Undeliverable,
    buckets_for,
    deliver,
    senders_for,
)
from consumers.alert_rules import ReportView, Rule, RuleSet, load_rule_file
from consumers.alert_state import AlertKey, AlertState, StateUnavailable
from consumers.contract import Consumer, Delivery
from consumers.errors import RetryableError
from core.logs import mask_phone
from core.settings import SettingsError, env_float, env_int, env_opt, env_str
from schemas.report import CallReport

log = logging.getLogger("callstream.alerting")

DEFAULT_STATE_PATH: Final = ".callstream/alerting.db"


@dataclass(frozen=True, slots=True)
class AlertingSettings:
    rules_path: Path | None
    state_path: Path
    network_policy: NetworkPolicy
    retry: RetryPolicy
    excerpt_chars: int
    summary_chars: int
    state_busy_timeout: float

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AlertingSettings:
        rules = env_opt(env, "CALLSTREAM_ALERT_RULES")
        try:
            policy = NetworkPolicy.parse(env.get("CALLSTREAM_ALERT_ALLOWED_NETWORKS"))
        except ValueError as exc:
            raise SettingsError(f"CALLSTREAM_ALERT_ALLOWED_NETWORKS: {exc}") from None
        retry = RetryPolicy(
            timeout=env_float(env, "CALLSTREAM_ALERT_TIMEOUT_SECONDS", 10.0, minimum=0.01),
            max_attempts=env_int(env, "CALLSTREAM_ALERT_MAX_ATTEMPTS", 5, minimum=1),
            budget=env_float(env, "CALLSTREAM_ALERT_RETRY_BUDGET_SECONDS", 120.0),
            backoff_base=env_float(env, "CALLSTREAM_ALERT_BACKOFF_SECONDS", 1.0),
            backoff_max=env_float(env, "CALLSTREAM_ALERT_BACKOFF_MAX_SECONDS", 30.0),
        )
        return cls(
            rules_path=Path(rules) if rules else None,
            state_path=Path(env_str(env, "CALLSTREAM_ALERT_STATE_PATH", DEFAULT_STATE_PATH)),
            network_policy=policy,
            retry=retry,
            excerpt_chars=env_int(env, "CALLSTREAM_ALERT_EXCERPT_CHARS", 280, minimum=20),
            summary_chars=env_int(env, "CALLSTREAM_ALERT_SUMMARY_CHARS", 600, minimum=20),
            state_busy_timeout=env_float(
                env, "CALLSTREAM_ALERT_STATE_BUSY_TIMEOUT_SECONDS", 5.0, minimum=0.0
            ),
        )


# -- privacy: what call content may appear in a message --------------------------------------

_URL = re.compile(
    r"""\b(?:[a-z][a-z0-9+.-]*://|www\.)[^\s<>"']+"""  # scheme:// or www.
    r"""|\b(?:[a-z0-9-]+\.)+[a-z]{2,}/[^\s<>"']*"""  # host.tld/path without a scheme
    # A bare host name, which chat clients turn into a link. Only common TLDs: matching any
    # "word.word" would eat sentences typed without a space after the full stop.
    r"""|\b(?:[a-z0-9-]+\.)+(?:com|net|org|nl|be|de|eu|io|co|uk|info|app|dev|ai|me)\b""",
    re.IGNORECASE,
)
_EMAIL_ADDRESS = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# A run of digits with the separators people speak or type numbers with. Eight digits is
# the shortest number worth masking (local numbers); shorter runs are amounts and scores.
_PHONE = re.compile(r"(?<![\w+])\+?\d[\d ()./-]{6,}\d")
_MIN_PHONE_DIGITS: Final = 8


def _mask_number(match: re.Match[str]) -> str:
    text = match.group()
    if sum(c.isdigit() for c in text) < _MIN_PHONE_DIGITS:
        return text
    return mask_phone(text) or ""


def privacy_safe(text: str) -> str:
    """No links, no e-mail addresses, no full phone numbers."""
    # Addresses first: their domain part would otherwise become "[link]" and leave the name.
    text = _EMAIL_ADDRESS.sub("[e-mail]", text)
    text = _URL.sub("[link]", text)
    return _PHONE.sub(_mask_number, text)


def clip(text: str, limit: int) -> str:
    """At most `limit` characters, cut at a word boundary when one is near."""
    text = text.strip()
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space > limit * 0.8:
        cut = cut[:space]
    return cut.rstrip() + "…"


def _display(value: Any, limit: int = 80) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, str):
        return clip(privacy_safe(" ".join(value.split())), limit)
    return clip(privacy_safe(orjson.dumps(value).decode()), limit)


def _json_safe(value: Any, limit: int = 200) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    return _display(value, limit)


def alert_id(key: AlertKey) -> str:
    return hashlib.sha256("\x1f".join(key).encode()).hexdigest()[:32]


def build_context(
    key: AlertKey, rule: Rule, report: CallReport, *, excerpt_chars: int, summary_chars: int
) -> AlertContext:
    """Everything a channel may show about this call, already made safe."""
    view = ReportView(report)
    matched = {ref.text: view.lookup(ref) for ref in rule.condition.fields}
    summary = report.summary or report.analysis_summary or ""
    duration = report.duration_seconds
    values = {
        "rule": rule.name,
        "call_id": report.call_id,
        "event_time": report.event_time.isoformat().replace("+00:00", "Z"),
        "call_type": report.call_type or "-",
        "call_status": report.call_status or "-",
        "ended_reason": report.ended_reason or "-",
        "assistant_name": _display(report.assistant_name) if report.assistant_name else "-",
        "duration_seconds": "-" if duration is None else _display(round(duration, 1)),
        "from_number": mask_phone(report.from_number) or "withheld",
        "to_number": mask_phone(report.to_number) or "-",
        "success_evaluation": _display(report.success_evaluation),
        "summary": clip(privacy_safe(summary), summary_chars) or "-",
        "excerpt": clip(privacy_safe(report.transcript or ""), excerpt_chars) or "-",
        "matched": ", ".join(f"{name}={_display(value)}" for name, value in matched.items()) or "-",
        "condition": rule.condition.text,
    }
    payload = {
        "rule": rule.name,
        "call_id": report.call_id,
        "event_time": values["event_time"],
        "call_type": report.call_type,
        "ended_reason": report.ended_reason,
        "duration_seconds": duration,
        "from_number": mask_phone(report.from_number),
        "to_number": mask_phone(report.to_number),
        "success_evaluation": _json_safe(report.success_evaluation),
        "summary": values["summary"],
        "excerpt": values["excerpt"],
        "matched": {name: _json_safe(value) for name, value in matched.items()},
    }
    return AlertContext(alert_id(key), values, payload)


# -- the consumer ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Planned:
    key: AlertKey
    rule: Rule
    report: CallReport


class AlertingConsumer(Consumer):
    """Evaluates the rules on each report and notifies their channels once per call."""

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
        self._unrecorded: dict[AlertKey, Delivered | Undeliverable] = {}

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

        to_send: list[_Planned] = []
        for key, status in claims.items():
            if status == "done":
                self._metrics.suppressed_duplicates.inc()
                continue
            if status == "resend":
                log.warning(
                    "re-sending an alert whose earlier attempt was interrupted",
                    extra={"rule": key.rule, "channel": key.channel, "call_id": key.call_id},
                )
            to_send.append(planned[key])

        # Channels go concurrently, but each channel sends one alert at a time and records it
        # before the next: a crash can then repeat at most one alert per channel.
        by_channel: dict[str, list[_Planned]] = {}
        for item in to_send:
            by_channel.setdefault(item.key.channel, []).append(item)
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
            await self._record(key, outcome)
        except StateUnavailable:
            self._unrecorded[key] = outcome
            raise

    async def _record(self, key: AlertKey, outcome: Delivered | Undeliverable) -> None:
        if isinstance(outcome, Delivered):
            await self._state.mark_sent(key, outcome.attempts)
        else:
            await self._state.mark_dead_lettered(
                key,
                channel_type=self._senders[key.channel].channel.type,
                reason=outcome.reason,
                detail=outcome.detail,
                attempts=outcome.attempts,
            )

    async def _write_unrecorded(self) -> None:
        for key, outcome in list(self._unrecorded.items()):
            await self._record(key, outcome)
            del self._unrecorded[key]


def build(env: Mapping[str, str], registry: CollectorRegistry) -> AlertingConsumer:
    """Settings and rules are read and validated here, so a bad file stops the start-up."""
    settings = AlertingSettings.from_env(env)
    rules = RuleSet() if settings.rules_path is None else load_rule_file(settings.rules_path, env)
    return AlertingConsumer(settings, rules, registry)
