"""The optional per-source rate limit: the token bucket on a fake clock, then the real
ingress over HTTP (real broker behind it)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry

from core.kafkasettings import KafkaSettings
from core.settings import SettingsError
from core.signing import WEBHOOK_PATH
from ingress.ratelimit import RateLimiter, bucket_key, limiter_for
from ingress.settings import IngressSettings
from tests.conftest import TEST_SECRET, Client, start_ingress
from tests.signing import signed
from tests.support.samples import SAMPLE


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the bucket ---------------------------------------------------------------------------


def test_a_burst_is_allowed_then_one_token_per_interval() -> None:
    clock = FakeClock()
    limiter = RateLimiter(2.0, 3, clock=clock)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.take("a") == 0.0
    assert limiter.take("a") == pytest.approx(0.5)


def test_refused_requests_do_not_spend_tokens() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, 1, clock=clock)
    assert limiter.take("a") == 0.0
    for _ in range(100):
        assert limiter.take("a") > 0
    clock.now += 1.0
    assert limiter.take("a") == 0.0


def test_an_idle_source_refills_only_up_to_the_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10.0, 2, clock=clock)
    limiter.take("a")
    clock.now += 3600
    assert [limiter.take("a") for _ in range(3)][:2] == [0.0, 0.0]
    assert limiter.take("a") > 0


def test_sources_have_separate_buckets() -> None:
    limiter = RateLimiter(1.0, 1, clock=FakeClock())
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    assert limiter.take("b") == 0.0


def test_memory_is_bounded_by_evicting_the_least_recently_seen_source() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, 1, max_sources=100, clock=clock)
    limiter.take("kept")
    for i in range(10_000):
        if i % 50 == 0:
            assert limiter.take("kept") > 0  # touched, so never the oldest
        limiter.take(f"flood-{i}")
        assert len(limiter) <= 100
    assert limiter.take("kept") > 0
    # An evicted source only comes back with a full bucket: more lenient, never stricter.
    assert limiter.take("flood-0") == 0.0


def test_a_clock_going_backwards_adds_no_tokens() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, 1, clock=clock)
    limiter.take("a")
    clock.now -= 100
    assert limiter.take("a") > 0


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("not-an-address", "not-an-address"),
        (None, "unknown"),
    ],
)
def test_bucket_keys(address: str | None, key: str) -> None:
    assert bucket_key(address) == key


def test_off_by_default_and_burst_defaults_to_one_second(kafka: KafkaSettings) -> None:
    assert limiter_for(IngressSettings.from_env({}, kafka=kafka)) is None
    limiter = limiter_for(
        IngressSettings.from_env({"CALLSTREAM_RATE_LIMIT_PER_SECOND": "2.5"}, kafka=kafka)
    )
    assert limiter is not None
    assert (limiter.rate, limiter.burst) == (2.5, 3)
    settings = IngressSettings.from_env(
        {
            "CALLSTREAM_RATE_LIMIT_PER_SECOND": "0.5",
            "CALLSTREAM_RATE_LIMIT_BURST": "20",
            "CALLSTREAM_TRUST_FORWARDED_FOR": "true",
        },
        kafka=kafka,
    )
    limiter = limiter_for(settings)
    assert limiter is not None
    assert (limiter.rate, limiter.burst, settings.trust_forwarded_for) == (0.5, 20, True)


@pytest.mark.parametrize(
    "env",
    [
        {"CALLSTREAM_RATE_LIMIT_PER_SECOND": "fast"},
        {"CALLSTREAM_RATE_LIMIT_PER_SECOND": "-1"},
        {"CALLSTREAM_RATE_LIMIT_BURST": "-2"},
        {"CALLSTREAM_TRUST_FORWARDED_FOR": "maybe"},
    ],
)
def test_bad_settings_name_the_variable(kafka: KafkaSettings, env: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match=next(iter(env))):
        IngressSettings.from_env(env, kafka=kafka)


# -- the real ingress -------------------------------------------------------------------------


@pytest.fixture
def limited_settings(ingress_settings: IngressSettings, tmp_path: Path) -> IngressSettings:
    # A slow refill, so the test's own pace never earns a token back.
    return dataclasses.replace(
        ingress_settings,
        rate_limit_per_second=0.05,
        rate_limit_burst=3,
        spool_dir=tmp_path / "spool",
    )


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def limited(
    limited_settings: IngressSettings, registry: CollectorRegistry
) -> AsyncIterator[Client]:
    client = await start_ingress(limited_settings, registry)
    try:
        yield client
    finally:
        await client.close()


def _report() -> bytes:
    payload = orjson.loads(SAMPLE.read_bytes())
    payload["callId"] = f"ratelimit-{time.monotonic_ns()}"
    return orjson.dumps(payload)


async def _post(client: Client, headers: dict[str, str] | None = None) -> int:
    body = _report()
    resp = await client.post(
        WEBHOOK_PATH, data=body, headers=signed(body, TEST_SECRET) | (headers or {})
    )
    await resp.read()
    return resp.status


async def test_past_the_burst_a_source_gets_429_problem_with_retry_after(
    limited: Client, registry: CollectorRegistry
) -> None:
    started = time.monotonic()
    assert [await _post(limited) for _ in range(3)] == [202, 202, 202]
    body = _report()
    resp = await limited.post(WEBHOOK_PATH, data=body, headers=signed(body, TEST_SECRET))
    assert resp.status == 429
    assert resp.content_type == "application/problem+json"
    problem = await resp.json()
    assert problem["type"] == "urn:callstream:problem:rate-limited"
    assert problem["status"] == 429
    assert problem["requestId"] == resp.headers["X-Request-Id"]
    # 0.05 tokens a second: the next one is 20 s after the first was taken, less the time
    # the three accepted requests took (the first one waits for Kafka's first connection).
    waited = time.monotonic() - started
    assert 20 - waited - 1 <= int(resp.headers["Retry-After"]) <= 20
    value = registry.get_sample_value(
        "callstream_ingress_requests_total", {"outcome": "rate-limited"}
    )
    assert value == 1.0


async def test_health_readiness_and_metrics_are_never_limited(limited: Client) -> None:
    for _ in range(4):
        await _post(limited)
    assert await _post(limited) == 429
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        for _ in range(5):
            resp = await limited.get(path)
            await resp.read()
            assert resp.status != 429, path


async def test_forwarded_for_is_ignored_unless_trusted(limited: Client) -> None:
    """Without trust, X-Forwarded-For is the client's word: it picks no bucket."""
    statuses = [await _post(limited, {"X-Forwarded-For": f"198.51.100.{i}"}) for i in range(1, 6)]
    assert statuses == [202, 202, 202, 429, 429]


async def test_trusted_forwarded_for_limits_each_client_behind_the_proxy(
    limited_settings: IngressSettings,
) -> None:
    settings = dataclasses.replace(limited_settings, trust_forwarded_for=True)
    client = await start_ingress(settings)
    try:
        # The proxy appends the address it saw; whatever the client put first is ignored.
        alice = {"X-Forwarded-For": "10.9.9.9, 198.51.100.1"}
        bob = {"X-Forwarded-For": "198.51.100.2"}
        assert [await _post(client, alice) for _ in range(4)] == [202, 202, 202, 429]
        assert [await _post(client, bob) for _ in range(3)] == [202, 202, 202]
        forged = {"X-Forwarded-For": "198.51.100.77, 198.51.100.1"}
        assert await _post(client, forged) == 429
    finally:
        await client.close()


async def test_without_a_limit_nothing_is_refused(ingress: Client) -> None:
    assert {await _post(ingress) for _ in range(30)} == {202}
