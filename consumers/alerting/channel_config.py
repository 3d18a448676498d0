"""What the rule file configures a channel as: its type, destination, template and rate."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Final, Literal, TypeAlias, get_args

from core.secret import Secret

ChannelType: TypeAlias = Literal["slack", "webhook", "email"]
CHANNEL_TYPES: Final[tuple[ChannelType, ...]] = get_args(ChannelType)

#: Placeholders a template may use (string.Template `$name`). Values are privacy-safe by
#: construction: phone numbers masked, URLs removed, free text cut short.
TEMPLATE_FIELDS: Final = frozenset(
    {
        "rule",
        "call_id",
        "event_time",
        "call_type",
        "call_status",
        "ended_reason",
        "assistant_name",
        "duration_seconds",
        "from_number",
        "to_number",
        "success_evaluation",
        "summary",
        "excerpt",
        "matched",
        "condition",
    }
)

DEFAULT_TEMPLATES: Final[Mapping[ChannelType, str]] = {
    "slack": (
        "*$rule*: call $call_id ($call_type, $duration_seconds s, from $from_number)\n"
        "matched: $matched\n"
        "$summary\n"
        "> $excerpt"
    ),
    "webhook": "$rule: call $call_id from $from_number ($duration_seconds s): $summary",
    "email": (
        "Rule: $rule\n"
        "Matched: $matched\n"
        "Call: $call_id at $event_time\n"
        "Type: $call_type, ended: $ended_reason, duration: $duration_seconds s\n"
        "From: $from_number  To: $to_number\n"
        "Success evaluation: $success_evaluation\n"
        "\n"
        "Summary:\n$summary\n"
        "\n"
        "Transcript excerpt:\n$excerpt\n"
    ),
}
DEFAULT_EMAIL_SUBJECT: Final = "[callstream] $rule: call $call_id"


@dataclass(frozen=True, slots=True)
class RateLimit:
    per_second: float = 1.0
    burst: int = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class _Channel:
    name: str
    template: str
    rate: RateLimit


@dataclass(frozen=True, slots=True, kw_only=True)
class SlackChannel(_Channel):
    type: ClassVar[ChannelType] = "slack"
    url: Secret  # an incoming-webhook URL carries its own token


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookChannel(_Channel):
    type: ClassVar[ChannelType] = "webhook"
    url: Secret
    secret: Secret


@dataclass(frozen=True, slots=True, kw_only=True)
class EmailChannel(_Channel):
    type: ClassVar[ChannelType] = "email"
    host: str
    port: int
    tls: bool  # implicit TLS from the first byte (usually port 465)
    starttls: bool  # upgrade a plain connection (usually port 587)
    sender: str
    recipients: tuple[str, ...]
    username: str | None
    password: Secret | None
    subject: str


ChannelConfig: TypeAlias = SlackChannel | WebhookChannel | EmailChannel
