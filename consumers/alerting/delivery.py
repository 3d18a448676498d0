"""Delivering one alert: every attempt waits for a token from the channel's bucket, so a
burst of matching calls cannot flood a Slack channel or a mailbox. `deliver` retries what may
succeed later (timeouts, connection errors, 5xx, 429 after its Retry-After, SMTP 4xx) with
exponential backoff and jitter, within a bounded number of attempts and a time budget, and
reports anything else (other 4xx, SMTP 5xx, a refused destination, an exhausted budget) as
undeliverable so the caller can dead-letter that one alert.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

from consumers.alerting.channels import (
    CHANNEL_TYPES,
    AlertContext,
    ChannelConfig,
    ChannelType,
    Sender,
)
from consumers.alerting.errors import DeliveryFailure, FailureReason

log = logging.getLogger("callstream.alerting")


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; a 429 pauses the whole channel."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._updated = time.monotonic()
        self._paused_until = 0.0
        # FIFO: alerts leave in the order they asked, so none starves behind later ones.
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
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
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)


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


def buckets_for(channels: Sequence[ChannelConfig]) -> dict[str, TokenBucket]:
    return {
        channel.name: TokenBucket(channel.rate.per_second, channel.rate.burst)
        for channel in channels
    }
