"""The variables of the storage, alerting and metrics consumers, declared with the same
`core.settings.Setting` the converted settings classes use, so that `.env.example` and the
deployment checks cover them.

Why a list apart: StorageSettings (consumers/storage.py), AlertingSettings
(consumers/alerting.py) and MetricsSettings (consumers/metrics_config.py) still read the
environment with the env_* helpers while their files are being reorganised. Converting one
means: declare each field with `setting(...)` (the entries below say the variable, default,
bounds and doc), give the class `EnvSettings.from_env`, and delete its table here.
tests/test_deploy_static.py holds each table to the variable names its module spells.
"""

from __future__ import annotations

from typing import Final

from core.settings import Setting

# (variable, default, minimum, doc); the secret one is marked by name below.
_Row = tuple[str, object, float, str]

# A table, laid out for reading row by row rather than by the formatter.
# fmt: off
_STORAGE: tuple[_Row, ...] = (
    ("CALLSTREAM_DATABASE_URL", None, 0, "PostgreSQL URL, postgresql://user:password@host:5432/db."
     " Empty: SQLite (next line)."),
    ("CALLSTREAM_SQLITE_PATH", ".callstream/callstream.db", 0,
     "SQLite file used when CALLSTREAM_DATABASE_URL is empty."),
)
_ALERTING: tuple[_Row, ...] = (
    ("CALLSTREAM_ALERT_RULES", None, 0,
     "Rule file (see examples/alert-rules.yaml). Empty: no rules, nothing alerts."),
    ("CALLSTREAM_ALERT_STATE_PATH", ".callstream/alerting.db", 0,
     "SQLite file recording which alerts were sent (once per rule, call and channel)."),
    ("CALLSTREAM_ALERT_ALLOWED_NETWORKS", None, 0,
     "CIDRs webhook/Slack channels may reach although private or loopback. Empty: none."),
    ("CALLSTREAM_ALERT_TIMEOUT_SECONDS", 10.0, 0.01, "Seconds one delivery attempt may take."),
    ("CALLSTREAM_ALERT_MAX_ATTEMPTS", 5, 1,
     "Delivery attempts per alert before it is dead-lettered."),
    ("CALLSTREAM_ALERT_RETRY_BUDGET_SECONDS", 120.0, 0,
     "Seconds from the first attempt to the last retry."),
    ("CALLSTREAM_ALERT_BACKOFF_SECONDS", 1.0, 0,
     "First back-off between attempts (seconds), doubling."),
    ("CALLSTREAM_ALERT_BACKOFF_MAX_SECONDS", 30.0, 0,
     "Longest back-off between attempts (seconds)."),
    ("CALLSTREAM_ALERT_EXCERPT_CHARS", 280, 20, "Characters of transcript excerpt in a message."),
    ("CALLSTREAM_ALERT_SUMMARY_CHARS", 600, 20, "Characters of call summary in a message."),
    ("CALLSTREAM_ALERT_STATE_BUSY_TIMEOUT_SECONDS", 5.0, 0,
     "Seconds to wait for a locked state file."),
)
_METRICS: tuple[_Row, ...] = (
    ("CALLSTREAM_METRICS_STATE_PATH", ".callstream/metrics.db", 0,
     "SQLite ledger of counted call ids (each call is counted once, ever)."),
    ("CALLSTREAM_METRICS_ASSISTANTS", None, 0, "Assistant numbers that get their own `assistant`"
     ' label: +31850835003=sales,+3120... Empty: all "other".'),
    ("CALLSTREAM_METRICS_SUCCESS_THRESHOLD", 7.0, 0, "A numeric success evaluation at or above"
     " this is a success (7 for 1..10, 70 for percentages)."),
    ("CALLSTREAM_METRICS_SENTIMENT_KEY", "sentiment", 0,
     "structured_data key holding the 0..10 sentiment score."),
    ("CALLSTREAM_METRICS_FOLLOWUP_KEY", "vervolgactie_nodig", 0,
     "structured_data key that is true when the call needs a follow-up."),
    ("CALLSTREAM_METRICS_TECHNICAL_PROBLEMS_KEY", "technische_problemen", 0,
     "structured_data key that is true when the call had technical problems."),
    ("CALLSTREAM_METRICS_CONFIG", None, 0,
     "YAML file of more structured_data fields to measure (examples/metrics.yaml). Empty: none."),
)
# fmt: on
# The database URL usually carries the password.
_SECRET: Final = frozenset({"CALLSTREAM_DATABASE_URL"})


def _settings(rows: tuple[_Row, ...]) -> tuple[Setting, ...]:
    return tuple(
        Setting(env, doc, default, minimum=minimum, secret=env in _SECRET)
        for env, default, minimum, doc in rows
    )


# Consumer name (consumers/registry.py) -> its variables, besides the port every one has.
BY_CONSUMER: Final = {
    "storage": _settings(_STORAGE),
    "alerting": _settings(_ALERTING),
    "metrics": _settings(_METRICS),
}
