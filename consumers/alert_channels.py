"""Getting one alert to one channel: Slack-compatible webhook, signed JSON webhook, e-mail.

Every attempt waits for a token from the channel's bucket, so a burst of matching calls
cannot flood a Slack channel or a mailbox. `deliver` retries what may succeed later
(timeouts, connection errors, 5xx, 429 after its Retry-After, SMTP 4xx) with exponential
backoff and jitter, within a bounded number of attempts and a time budget, and reports
anything else (other 4xx, SMTP 5xx, a refused destination, an exhausted budget) as
undeliverable so the caller can dead-letter that one alert.

Outgoing HTTP never reaches private, loopback, link-local, multicast, reserved or
unspecified addresses unless `allowed_networks` lists them. The check runs on the
addresses the connection will actually use: host names go through `GuardedResolver`
(aiohttp connects only to the addresses a resolver returns, so a rebinding DNS answer is
checked, not trusted), IP literals are checked before the request, and redirects are
followed by hand, re-checking every hop.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import logging
import math
import random
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from string import Template
from typing import Any, Final, Literal, Protocol, TypeAlias

import aiohttp
import aiosmtplib
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from prometheus_client import CollectorRegistry, Counter, Histogram
from yarl import URL

from consumers.alert_rules import (
    CHANNEL_TYPES,
    ChannelConfig,
    ChannelType,
    EmailChannel,
    SlackChannel,
    WebhookChannel,
)
from core.signing import SIGNATURE_PREFIX, hmac_hex

log = logging.getLogger("callstream.alerting")

FailureReason: TypeAlias = Literal[
    "timeout",
    "connection",
    "rate_limited",
    "server_error",
    "client_error",
    "destination_refused",
    "redirect",
    "smtp_temporary",
    "smtp_permanent",
    "internal",
]
FAILURE_REASONS: Final[tuple[FailureReason, ...]] = (
    "timeout",
    "connection",
    "rate_limited",
    "server_error",
    "client_error",
    "destination_refused",
    "redirect",
    "smtp_temporary",
    "smtp_permanent",
    "internal",
)
MAX_REDIRECTS: Final = 3
# Every redirect re-sends the same POST (browsers turn 301/302/303 into a GET, which would
# deliver an empty alert); each hop is checked like the first and the signature is fresh.
_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
USER_AGENT: Final = "callstream-alerting/1"
SIGNATURE_HEADER: Final = "X-Callstream-Signature"
TIMESTAMP_HEADER: Final = "X-Callstream-Timestamp"
ALERT_ID_HEADER: Final = "X-Callstream-Alert-Id"


class DeliveryFailure(Exception):
    """One failed attempt. `permanent`: retrying cannot help."""

    def __init__(
        self,
        reason: FailureReason,
        detail: str,
        *,
        permanent: bool,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: FailureReason = reason
        self.detail = detail
        self.permanent = permanent
        self.retry_after = retry_after


# -- destinations ---------------------------------------------------------------------------

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


class DestinationRefused(Exception):
    """An address outgoing webhooks must not reach.

    Deliberately not an OSError: aiohttp would wrap that into a retryable DNS error.
    """


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> NetworkPolicy:
        """Comma-separated CIDRs; raises ValueError naming the bad entry."""
        networks: list[IPNetwork] = []
        for part in (text or "").split(","):
            if part.strip():
                try:
                    networks.append(ipaddress.ip_network(part.strip(), strict=False))
                except ValueError as exc:
                    raise ValueError(f"{part.strip()!r} is not a CIDR network: {exc}") from None
        return cls(tuple(networks))

    def refusal(self, address: IPAddress) -> str | None:
        """Why `address` may not be reached, or None when it may."""
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        for candidate in (address, mapped):
            if candidate is not None and any(candidate in net for net in self.allowed):
                return None
        target = mapped or address
        if isinstance(target, ipaddress.IPv6Address) and (target.sixtofour or target.teredo):
            # 6to4 and Teredo tunnel to an embedded IPv4 address the checks below never see.
            return f"{address} tunnels to an IPv4 address"
        for attribute in (
            "is_loopback",
            "is_link_local",
            "is_multicast",
            "is_unspecified",
            "is_reserved",
            "is_private",
        ):
            if getattr(target, attribute):
                return f"{address} is {attribute.removeprefix('is_').replace('_', '-')}"
        if not target.is_global:
            return f"{address} is not a public address"
        return None

    def check(self, address: str) -> None:
        try:
            parsed = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            raise DestinationRefused(f"{address!r} is not an IP address") from None
        reason = self.refusal(parsed)
        if reason is not None:
            raise DestinationRefused(reason)


class GuardedResolver(AbstractResolver):
    """Resolves with the system resolver and hands aiohttp only the allowed addresses."""

    def __init__(self, policy: NetworkPolicy) -> None:
        self._policy = policy
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed: list[ResolveResult] = []
        refusals: list[str] = []
        for result in results:
            try:
                self._policy.check(result["host"])
            except DestinationRefused as exc:
                refusals.append(str(exc))
            else:
                allowed.append(result)
        if not allowed:
            raise DestinationRefused(f"{host} resolves only to refused addresses: {refusals}")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


# -- rate limiting --------------------------------------------------------------------------


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; a 429 pauses the whole channel."""

    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()
        self._paused_until = 0.0
        # FIFO: alerts leave in the order they asked, so none starves behind later ones.
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = self._clock()
                self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
                self._updated = now
                wait = self._paused_until - now
                if wait <= 0:
                    if self._tokens >= 1:
                        self._tokens -= 1
                        return
                    wait = (1 - self._tokens) / self._rate
                await asyncio.sleep(wait)

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, self._clock() + seconds)


# -- metrics --------------------------------------------------------------------------------


class AlertMetrics:
    """Labels are channel types and bounded reasons only: never a number, a call or a rule."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.sent = Counter(
            "callstream_alerts_sent",
            "Alerts delivered, by channel type.",
            ["channel_type"],
            registry=registry,
        )
        self.failed = Counter(
            "callstream_alerts_failed",
            "Failed delivery attempts (retried or not), by channel type and reason.",
            ["channel_type", "reason"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            "callstream_alerts_dead_lettered",
            "Alerts given up on and written to alert_dead_letters, by channel type.",
            ["channel_type"],
            registry=registry,
        )
        self.suppressed_duplicates = Counter(
            "callstream_alerts_suppressed_duplicates",
            "Alerts not sent because that (rule, call, channel) was already handled.",
            registry=registry,
        )
        self.send_duration = Histogram(
            "callstream_alert_send_duration_seconds",
            "Duration of one delivery attempt, by channel type.",
            ["channel_type"],
            registry=registry,
        )
        for channel_type in CHANNEL_TYPES:
            self.sent.labels(channel_type)
            self.dead_lettered.labels(channel_type)


# -- what a channel sends -------------------------------------------------------------------


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


class GuardedHttp:
    """One aiohttp session whose every connection and redirect hop is policy-checked."""

    def __init__(self, policy: NetworkPolicy) -> None:
        self._policy = policy
        self._session: aiohttp.ClientSession | None = None
        self._resolver: GuardedResolver | None = None

    async def start(self) -> None:
        if self._session is None:
            self._resolver = GuardedResolver(self._policy)
            connector = aiohttp.TCPConnector(resolver=self._resolver, limit=64)
            self._session = aiohttp.ClientSession(
                connector=connector, headers={"User-Agent": USER_AGENT}, trust_env=False
            )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        resolver, self._resolver = self._resolver, None
        if resolver is not None:  # a resolver handed to a connector is not closed by it
            await resolver.close()

    def _check_literal(self, url: URL) -> None:
        if url.scheme not in ("http", "https") or not url.host:
            raise DestinationRefused(f"{url.scheme or 'no'} scheme or no host")
        host = url.host
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return  # a name: GuardedResolver checks what it resolves to
        # aiohttp skips the resolver for IP literals, so they are checked here.
        self._policy.check(host)

    async def post(
        self, url: str, body: bytes, headers: Callable[[], dict[str, str]], timeout: float
    ) -> None:
        if self._session is None:
            raise DeliveryFailure("internal", "HTTP client not started", permanent=True)
        current = URL(url)
        deadline = time.monotonic() + timeout
        for _hop in range(MAX_REDIRECTS + 1):
            host = current.host or "?"  # never the URL: a Slack URL is a credential
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeliveryFailure("timeout", f"no answer within {timeout:g}s", permanent=False)
            try:
                self._check_literal(current)
                async with self._session.post(
                    current,
                    data=body,
                    headers=headers(),
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=remaining),
                ) as response:
                    status = response.status
                    if 200 <= status < 300:
                        return
                    if status in _REDIRECT_STATUSES:
                        current = _redirect_target(current, response.headers.get("Location"))
                        continue
                    raise _http_failure(status, host, response.headers.get("Retry-After"))
            except DestinationRefused as exc:
                raise DeliveryFailure(
                    "destination_refused", f"refused destination: {exc}", permanent=True
                ) from exc
            except TimeoutError as exc:
                raise DeliveryFailure(
                    "timeout", f"{host} did not answer within {timeout:g}s", permanent=False
                ) from exc
            except aiohttp.InvalidURL as exc:
                raise DeliveryFailure("client_error", "invalid URL", permanent=True) from exc
            except aiohttp.ClientError as exc:
                raise DeliveryFailure(
                    "connection", f"{host}: {type(exc).__name__}", permanent=False
                ) from exc
        raise DeliveryFailure("redirect", f"more than {MAX_REDIRECTS} redirects", permanent=True)


def _redirect_target(current: URL, location: str | None) -> URL:
    if not location:
        raise DeliveryFailure("redirect", "redirect without a Location", permanent=True)
    try:
        target = current.join(URL(location))
    except ValueError as exc:
        raise DeliveryFailure("redirect", "redirect to an invalid URL", permanent=True) from exc
    if current.scheme == "https" and target.scheme != "https":
        raise DeliveryFailure("redirect", "redirect from https to plain http", permanent=True)
    return target


def _http_failure(status: int, host: str, retry_after: str | None) -> DeliveryFailure:
    detail = f"HTTP {status} from {host}"
    if status == 429:
        return DeliveryFailure(
            "rate_limited", detail, permanent=False, retry_after=parse_retry_after(retry_after)
        )
    if status == 408 or status >= 500:
        return DeliveryFailure("server_error", detail, permanent=False)
    return DeliveryFailure("client_error", detail, permanent=True)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return None if math.isnan(seconds) else max(0.0, seconds)


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
    return SIGNATURE_PREFIX + hmac_hex(secret, timestamp, body)


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
            temporary = bool(codes) and all(400 <= code < 500 for code in codes)
            raise DeliveryFailure(
                "smtp_temporary" if temporary else "smtp_permanent",
                f"{host} refused the recipients ({', '.join(map(str, codes))})",
                permanent=not temporary,
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            temporary = 400 <= exc.code < 500
            raise DeliveryFailure(
                "smtp_temporary" if temporary else "smtp_permanent",
                f"{host} answered {exc.code}",
                permanent=not temporary,
            ) from exc
        except aiosmtplib.SMTPNotSupported as exc:
            raise DeliveryFailure(
                "smtp_permanent", f"{host}: {exc.message}", permanent=True
            ) from exc
        except TimeoutError as exc:
            raise DeliveryFailure(
                "timeout", f"{host} did not finish within {timeout:g}s", permanent=False
            ) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise DeliveryFailure(
                "connection", f"{host}: {type(exc).__name__}", permanent=False
            ) from exc


def make_sender(channel: ChannelConfig, http: GuardedHttp) -> Sender:
    if isinstance(channel, SlackChannel):
        return SlackSender(channel, http)
    if isinstance(channel, WebhookChannel):
        return WebhookSender(channel, http)
    return EmailSender(channel)


# -- retries --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    timeout: float = 10.0  # one attempt
    max_attempts: int = 5
    budget: float = 120.0  # from the first attempt to the start of the last
    backoff_base: float = 1.0
    backoff_max: float = 30.0

    def backoff(self, attempt: int) -> float:
        """Exponential with equal jitter: half fixed, half random, so retries spread out."""
        ceiling = min(self.backoff_max, self.backoff_base * 2.0 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


@dataclass(frozen=True, slots=True)
class Delivered:
    attempts: int


@dataclass(frozen=True, slots=True)
class Undeliverable:
    reason: FailureReason
    detail: str
    attempts: int


async def deliver(
    sender: Sender,
    context: AlertContext,
    bucket: TokenBucket,
    policy: RetryPolicy,
    metrics: AlertMetrics,
) -> Delivered | Undeliverable:
    """Send with rate limit and retries; never raises for a channel problem."""
    channel_type: ChannelType = sender.channel.type
    deadline: float | None = None
    attempt = 0
    while True:
        await bucket.acquire()
        attempt += 1
        started = time.monotonic()
        if deadline is None:
            deadline = started + policy.budget
        failure = await _attempt(sender, context, policy.timeout)
        metrics.send_duration.labels(channel_type).observe(time.monotonic() - started)
        if failure is None:
            metrics.sent.labels(channel_type).inc()
            return Delivered(attempt)
        metrics.failed.labels(channel_type, failure.reason).inc()
        if failure.permanent:
            return Undeliverable(failure.reason, failure.detail, attempt)
        if attempt >= policy.max_attempts:
            return Undeliverable(
                failure.reason, f"gave up after {attempt} attempts: {failure.detail}", attempt
            )
        delay = failure.retry_after
        if delay is not None:
            bucket.pause(delay)  # the receiver asked it of everything we send there
        else:
            delay = policy.backoff(attempt)
        if time.monotonic() + delay > deadline:
            return Undeliverable(
                failure.reason,
                f"gave up after {attempt} attempt(s): waiting {delay:.1f}s more would pass "
                f"the {policy.budget:g}s retry budget: {failure.detail}",
                attempt,
            )
        log.info(
            "alert delivery failed, retrying",
            extra={
                "channel": sender.channel.name,
                "reason": failure.reason,
                "attempt": attempt,
                "retry_in": round(delay, 3),
            },
        )
        await asyncio.sleep(delay)


async def _attempt(sender: Sender, context: AlertContext, timeout: float) -> DeliveryFailure | None:
    try:
        await sender.send(context, timeout)
    except DeliveryFailure as exc:
        return exc
    except Exception as exc:  # a bug in a sender must cost one alert, not the batch
        log.exception("alert sender failed unexpectedly", extra={"channel": sender.channel.name})
        return DeliveryFailure("internal", type(exc).__name__, permanent=True)
    return None


def senders_for(channels: Iterable[ChannelConfig], http: GuardedHttp) -> dict[str, Sender]:
    return {channel.name: make_sender(channel, http) for channel in channels}


def buckets_for(channels: Sequence[ChannelConfig]) -> dict[str, TokenBucket]:
    return {
        channel.name: TokenBucket(channel.rate.per_second, channel.rate.burst)
        for channel in channels
    }
