"""Settings of the alerting consumer, read once from the environment: the
CALLSTREAM_ALERT_* variables, each listed with its default and meaning in .env.example.
Secrets (webhook signing keys, Slack URLs, SMTP passwords) are read from the variables the
rule file names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from consumers.alerting.delivery import RetryPolicy
from consumers.alerting.egress import NetworkPolicy
from core.settings import SettingsError, env_float, env_int, env_opt, env_str

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
