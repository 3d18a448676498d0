"""Getting one alert to one channel, once: Slack-compatible webhook, signed JSON webhook,
e-mail. Each sender raises DeliveryFailure saying whether a retry can help; retries and rate
limits are consumers.alerting.delivery's.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from email.message import EmailMessage
from string import Template
from typing import Final, Protocol

import aiosmtplib
import orjson

from consumers.alerting.channel_config import (
    ChannelConfig,
    EmailChannel,
    SlackChannel,
    WebhookChannel,
)
from consumers.alerting.context import AlertContext
from consumers.alerting.egress import GuardedHttp
from consumers.alerting.errors import DeliveryFailure
from core.signing import hmac_hex

SIGNATURE_HEADER: Final = "X-Callstream-Signature"
TIMESTAMP_HEADER: Final = "X-Callstream-Timestamp"
ALERT_ID_HEADER: Final = "X-Callstream-Alert-Id"


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


class SlackSender:
    def __init__(self, channel: SlackChannel, http: GuardedHttp) -> None:
        self.channel = channel
        self._http = http

    async def send(self, context: AlertContext, timeout: float) -> None:
        escaped = {key: _slack_escape(value) for key, value in context.values.items()}
        body = orjson.dumps({"text": render(self.channel.template, escaped)})
        await self._http.post(
            self.channel.url.reveal(),
            body,
            lambda: {"Content-Type": "application/json"},
            timeout,
        )


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """`sha256=<hex>` of HMAC-SHA256 over `timestamp.body` (as Flireo signs its own)."""
    return f"sha256={hmac_hex(secret, timestamp, body)}"


class WebhookSender:
    def __init__(self, channel: WebhookChannel, http: GuardedHttp) -> None:
        self.channel = channel
        self._http = http

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
                SIGNATURE_HEADER: sign(secret, timestamp, body),
                ALERT_ID_HEADER: context.alert_id,
            }

        await self._http.post(self.channel.url.reveal(), body, headers, timeout)


class EmailSender:
    def __init__(self, channel: EmailChannel) -> None:
        self.channel = channel

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
