"""The alert channels: what the rule file configures each as, and how each gets one alert
to its destination once (Slack-compatible webhook, signed JSON webhook, e-mail). A sender
raises DeliveryFailure saying whether a retry can help; retries and rate limits are
consumers.alerting.delivery's.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from string import Template
from typing import Any, ClassVar, Final, Literal, Protocol, TypeAlias, get_args

import aiosmtplib
import orjson

from consumers.alerting.egress import GuardedHttp
from consumers.alerting.errors import DeliveryFailure
from core.secret import Secret
from core.signing import SIGNATURE_PREFIX, hmac_hex

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

SIGNATURE_HEADER: Final = "X-Callstream-Signature"
TIMESTAMP_HEADER: Final = "X-Callstream-Timestamp"
ALERT_ID_HEADER: Final = "X-Callstream-Alert-Id"


@dataclass(frozen=True, slots=True)
class AlertContext:
    """One alert, already made privacy-safe: the template values and the JSON payload."""

    alert_id: str  # stable per (rule, call_id, channel): receivers can drop duplicates
    values: Mapping[str, str]  # every TEMPLATE_FIELDS name -> display text
    payload: Mapping[str, Any] = field(default_factory=dict)  # for JSON webhooks


def render(template: str, values: Mapping[str, str]) -> str:
    # safe_substitute: a template validated at start-up never misses a name, and a stray
    # "$" must not turn an alert into an exception.
    return Template(template).safe_substitute(values)


def _slack_escape(text: str) -> str:
    # Slack reads <...> as links and mentions (<!channel>); call content must stay text.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Sender(Protocol):
    @property
    def channel(self) -> ChannelConfig: ...

    async def send(self, context: AlertContext, timeout: float) -> None:
        """Deliver once or raise DeliveryFailure."""


@dataclass(frozen=True, slots=True)
class SlackSender:
    channel: SlackChannel
    http: GuardedHttp

    async def send(self, context: AlertContext, timeout: float) -> None:
        escaped = {key: _slack_escape(value) for key, value in context.values.items()}
        body = orjson.dumps({"text": render(self.channel.template, escaped)})
        headers = {"Content-Type": "application/json"}
        await self.http.post(self.channel.url.reveal(), body, lambda: headers, timeout)


@dataclass(frozen=True, slots=True)
class WebhookSender:
    channel: WebhookChannel
    http: GuardedHttp

    async def send(self, context: AlertContext, timeout: float) -> None:
        body = orjson.dumps(
            {
                **context.payload,
                "alert_id": context.alert_id,
                "channel": self.channel.name,
                "text": render(self.channel.template, context.values),
            }
        )
        secret = self.channel.secret.reveal().encode()

        def headers() -> dict[str, str]:
            # Signed per request: a retry an hour later must not carry an expired timestamp.
            timestamp = str(int(time.time()))
            return {
                "Content-Type": "application/json",
                TIMESTAMP_HEADER: timestamp,
                # `sha256=<hex>` of HMAC-SHA256 over `timestamp.body`, as Flireo signs its own.
                SIGNATURE_HEADER: SIGNATURE_PREFIX + hmac_hex(secret, timestamp, body),
                ALERT_ID_HEADER: context.alert_id,
            }

        await self.http.post(self.channel.url.reveal(), body, headers, timeout)


@dataclass(frozen=True, slots=True)
class EmailSender:
    channel: EmailChannel

    def message(self, context: AlertContext) -> EmailMessage:
        subject = " ".join(render(self.channel.subject, context.values).split())
        message = EmailMessage()
        message["From"] = self.channel.sender
        message["To"] = ", ".join(self.channel.recipients)
        message["Subject"] = subject[:200]
        message["Date"] = email.utils.format_datetime(datetime.now(UTC))
        # Stable per alert, so a duplicate after a crash is recognisable as one.
        message["Message-ID"] = f"<{context.alert_id}@callstream.alerting>"
        message.set_content(render(self.channel.template, context.values))
        return message

    async def send(self, context: AlertContext, timeout: float) -> None:
        channel = self.channel
        host = channel.host
        try:
            # aiosmtplib's timeout is per command; the outer one bounds the whole exchange.
            async with asyncio.timeout(timeout):
                await aiosmtplib.send(
                    self.message(context),
                    hostname=host,
                    port=channel.port,
                    username=channel.username,
                    password=channel.password.reveal() if channel.password else None,
                    use_tls=channel.tls,
                    start_tls=channel.starttls,
                    timeout=timeout,
                )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [refused.code for refused in exc.recipients]
            detail = f"{host} refused the recipients ({', '.join(map(str, codes))})"
            raise DeliveryFailure.smtp(codes, detail) from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise DeliveryFailure.smtp([exc.code], f"{host} answered {exc.code}") from exc
        except aiosmtplib.SMTPNotSupported as exc:
            detail = f"{host}: {exc.message}"
            raise DeliveryFailure("smtp_permanent", detail, permanent=True) from exc
        except TimeoutError as exc:
            raise DeliveryFailure.timed_out(f"{host} did not finish within {timeout:g}s") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise DeliveryFailure.unreachable(host, exc) from exc


def make_sender(channel: ChannelConfig, http: GuardedHttp) -> Sender:
    if isinstance(channel, SlackChannel):
        return SlackSender(channel, http)
    if isinstance(channel, WebhookChannel):
        return WebhookSender(channel, http)
    return EmailSender(channel)


def senders_for(channels: Iterable[ChannelConfig], http: GuardedHttp) -> dict[str, Sender]:
    return {channel.name: make_sender(channel, http) for channel in channels}
