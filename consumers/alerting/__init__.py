"""The alerting consumer: YAML rules over each call report, notifications to Slack, signed
webhooks and e-mail, each sent once per (rule, call, channel).

What the rest of callstream (the registry, the tests) uses is exported here; the modules
behind it are free to move.
"""

from consumers.alerting.channels import EmailChannel
from consumers.alerting.conditions import ConditionError, ReportView, parse_condition
from consumers.alerting.consumer import AlertingConsumer, build
from consumers.alerting.egress import NetworkPolicy, parse_retry_after
from consumers.alerting.message import privacy_safe
from consumers.alerting.rule_file import RuleFileError, load_rule_file
from consumers.alerting.settings import AlertingSettings
from consumers.alerting.state import AlertKey, AlertState

__all__ = [
    "AlertKey",
    "AlertState",
    "AlertingConsumer",
    "AlertingSettings",
    "ConditionError",
    "EmailChannel",
    "NetworkPolicy",
    "ReportView",
    "RuleFileError",
    "build",
    "load_rule_file",
    "parse_condition",
    "parse_retry_after",
    "privacy_safe",
]
