"""The variables of the storage, alerting and metrics consumers, declared with the same
`core.settings.Setting` the converted settings classes use, so that `.env.example` and the
deployment checks cover them.

Why a list apart: StorageSettings (consumers/storage.py), AlertingSettings
(consumers/alerting.py) and MetricsSettings (consumers/metrics_config.py) still read the
environment with the env_* helpers while their files are being reorganised. Converting one
means: declare each field with `setting(...)` (the entries below say the variable, default,
bounds and doc), give the class `EnvSettings.from_env`, and delete its tuple here.
tests/test_deploy_static.py holds each tuple to the variable names its module spells.
"""

from __future__ import annotations

from typing import Final

from core.settings import Setting

STORAGE: Final = (
    Setting(
        "CALLSTREAM_DATABASE_URL",
        "PostgreSQL URL, postgresql://user:password@host:5432/db. Empty: SQLite (next line).",
        None,
        secret=True,
    ),
    Setting(
        "CALLSTREAM_SQLITE_PATH",
        "SQLite file used when CALLSTREAM_DATABASE_URL is empty.",
        ".callstream/callstream.db",
    ),
)

ALERTING: Final = (
    Setting(
        "CALLSTREAM_ALERT_RULES",
        "Rule file (see examples/alert-rules.yaml). Empty: no rules, nothing alerts.",
        None,
    ),
    Setting(
        "CALLSTREAM_ALERT_STATE_PATH",
        "SQLite file recording which alerts were sent (once per rule, call and channel).",
        ".callstream/alerting.db",
    ),
    Setting(
        "CALLSTREAM_ALERT_ALLOWED_NETWORKS",
        "CIDRs webhook/Slack channels may reach although private or loopback. Empty: none.",
        None,
    ),
    Setting(
        "CALLSTREAM_ALERT_TIMEOUT_SECONDS",
        "Seconds one delivery attempt may take.",
        10.0,
        minimum=0.01,
    ),
    Setting(
        "CALLSTREAM_ALERT_MAX_ATTEMPTS",
        "Delivery attempts per alert before it is dead-lettered.",
        5,
        minimum=1,
    ),
    Setting(
        "CALLSTREAM_ALERT_RETRY_BUDGET_SECONDS",
        "Seconds from the first attempt to the last retry.",
        120.0,
    ),
    Setting(
        "CALLSTREAM_ALERT_BACKOFF_SECONDS",
        "First back-off between attempts (seconds), doubling.",
        1.0,
    ),
    Setting(
        "CALLSTREAM_ALERT_BACKOFF_MAX_SECONDS", "Longest back-off between attempts (seconds).", 30.0
    ),
    Setting(
        "CALLSTREAM_ALERT_EXCERPT_CHARS",
        "Characters of transcript excerpt in a message.",
        280,
        minimum=20,
    ),
    Setting(
        "CALLSTREAM_ALERT_SUMMARY_CHARS",
        "Characters of call summary in a message.",
        600,
        minimum=20,
    ),
    Setting(
        "CALLSTREAM_ALERT_STATE_BUSY_TIMEOUT_SECONDS",
        "Seconds to wait for a locked state file.",
        5.0,
    ),
)

METRICS: Final = (
    Setting(
        "CALLSTREAM_METRICS_STATE_PATH",
        "SQLite ledger of counted call ids (each call is counted once, ever).",
        ".callstream/metrics.db",
    ),
    Setting(
        "CALLSTREAM_METRICS_ASSISTANTS",
        "Assistant numbers that get their own `assistant` label: +31850835003=sales,+3120... "
        'Empty: all "other".',
        None,
    ),
    Setting(
        "CALLSTREAM_METRICS_SUCCESS_THRESHOLD",
        "A numeric success evaluation at or above this is a success (7 for 1..10, 70 for "
        "percentages).",
        7.0,
    ),
    Setting(
        "CALLSTREAM_METRICS_SENTIMENT_KEY",
        "structured_data key holding the 0..10 sentiment score.",
        "sentiment",
    ),
    Setting(
        "CALLSTREAM_METRICS_FOLLOWUP_KEY",
        "structured_data key that is true when the call needs a follow-up.",
        "vervolgactie_nodig",
    ),
    Setting(
        "CALLSTREAM_METRICS_TECHNICAL_PROBLEMS_KEY",
        "structured_data key that is true when the call had technical problems.",
        "technische_problemen",
    ),
    Setting(
        "CALLSTREAM_METRICS_CONFIG",
        "YAML file of more structured_data fields to measure (examples/metrics.yaml). Empty: none.",
        None,
    ),
)

# Consumer name (consumers/registry.py) -> its variables, besides the port every one has.
BY_CONSUMER: Final = {"storage": STORAGE, "alerting": ALERTING, "metrics": METRICS}
