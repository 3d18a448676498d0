"""Settings of the alerting consumer, read once from the environment: the
CALLSTREAM_ALERT_* variables. Secrets (webhook signing keys, Slack URLs, SMTP passwords) are
read from the variables the rule file names.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from consumers.alerting.delivery import RetryPolicy
from consumers.alerting.egress import NetworkPolicy
from core.settings import EnvSettings, SettingsError, setting, settings_class


@settings_class
class AlertingSettings(EnvSettings):
    rules_path: Path | None = setting(
        "CALLSTREAM_ALERT_RULES",
        default=None,
        doc="Rule file (see examples/alert-rules.yaml). Empty: no rules, nothing alerts.",
    )
    state_path: Path = setting(
        "CALLSTREAM_ALERT_STATE_PATH",
        default=Path(".callstream/alerting.db"),
        doc="SQLite file recording which alerts were sent (once per rule, call and channel).",
    )
    allowed_networks: str | None = setting(
        "CALLSTREAM_ALERT_ALLOWED_NETWORKS",
        default=None,
        doc="CIDRs webhook/Slack channels may reach although private or loopback. Empty: none.",
    )
    timeout_seconds: float = setting(
        "CALLSTREAM_ALERT_TIMEOUT_SECONDS",
        default=10.0,
        minimum=0.01,
        doc="Seconds one delivery attempt may take.",
    )
    max_attempts: int = setting(
        "CALLSTREAM_ALERT_MAX_ATTEMPTS",
        default=5,
        minimum=1,
        doc="Delivery attempts per alert before it is dead-lettered.",
    )
    retry_budget_seconds: float = setting(
        "CALLSTREAM_ALERT_RETRY_BUDGET_SECONDS",
        default=120.0,
        doc="Seconds from the first attempt to the last retry.",
    )
    backoff_seconds: float = setting(
        "CALLSTREAM_ALERT_BACKOFF_SECONDS",
        default=1.0,
        doc="First back-off between attempts (seconds), doubling.",
    )
    backoff_max_seconds: float = setting(
        "CALLSTREAM_ALERT_BACKOFF_MAX_SECONDS",
        default=30.0,
        doc="Longest back-off between attempts (seconds).",
    )
    excerpt_chars: int = setting(
        "CALLSTREAM_ALERT_EXCERPT_CHARS",
        default=280,
        minimum=20,
        doc="Characters of transcript excerpt in a message.",
    )
    summary_chars: int = setting(
        "CALLSTREAM_ALERT_SUMMARY_CHARS",
        default=600,
        minimum=20,
        doc="Characters of call summary in a message.",
    )
    state_busy_timeout: float = setting(
        "CALLSTREAM_ALERT_STATE_BUSY_TIMEOUT_SECONDS",
        default=5.0,
        doc="Seconds to wait for a locked state file.",
    )

    def __post_init__(self) -> None:
        _ = self.network_policy  # parsed now: a bad CIDR stops the consumer at start-up

    @cached_property
    def network_policy(self) -> NetworkPolicy:
        try:
            return NetworkPolicy.parse(self.allowed_networks)
        except ValueError as exc:
            raise SettingsError(f"CALLSTREAM_ALERT_ALLOWED_NETWORKS: {exc}") from None

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(
            timeout=self.timeout_seconds,
            max_attempts=self.max_attempts,
            budget=self.retry_budget_seconds,
            backoff_base=self.backoff_seconds,
            backoff_max=self.backoff_max_seconds,
        )
