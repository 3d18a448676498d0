"""The alerting consumer, and what the registry and the tests use of it."""

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
