"""An optional per-source rate limit: one token bucket per client address, 429 past it.

Off unless CALLSTREAM_RATE_LIMIT_PER_SECOND is set. Flireo posts every report of an account
from a handful of addresses, so the limit has to sit well above that account's peak: it is
there to keep one misbehaving or hostile source from crowding out the others, not to shape
Flireo's own traffic.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ingress.errors import Problem
from ingress.settings import IngressSettings

# ~100 bytes a bucket: 10,000 sources cost about a megabyte, however many addresses call.
DEFAULT_MAX_SOURCES = 10_000
FORWARDED_FOR = "X-Forwarded-For"


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets keyed by source, refilled at `rate` per second up to `burst`.

    Buckets live in an LRU of at most `max_sources`. Evicting one only forgets that source's
    debt (it comes back with a full bucket), so the bound can make the limit more lenient
    under a flood from many addresses, never stricter for anyone.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_sources: int = DEFAULT_MAX_SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or max_sources < 1:
            raise ValueError("rate must be positive, burst and max_sources at least 1")
        self.rate = rate
        self.burst = burst
        self._max_sources = max_sources
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, source: str) -> float:
        """Take a token for `source`: 0.0 if there was one, else seconds until there is."""
        now = self._clock()
        bucket = self._buckets.get(source)
        if bucket is None:
            bucket = self._buckets[source] = _Bucket(float(self.burst), now)
            if len(self._buckets) > self._max_sources:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(source)
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate


def source_of(request: web.Request, *, trust_forwarded_for: bool) -> str:
    address = request.remote
    if trust_forwarded_for:
        # The rightmost entry is the one our own proxy appended (the address it saw); anything
        # to its left came from the client and costs nothing to forge. Behind two proxies this
        # is the outer proxy's address, which only makes the limit coarser.
        values = request.headers.getall(FORWARDED_FOR, [])
        hops = [hop.strip() for value in values for hop in value.split(",") if hop.strip()]
        address = hops[-1] if hops else address
    return bucket_key(address)


def bucket_key(address: str | None) -> str:
    """IPv4 addresses count one by one; IPv6 ones by /64, the block a single site gets, so
    walking through one's own 2**64 addresses does not buy 2**64 buckets."""
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def limiter_for(settings: IngressSettings) -> RateLimiter | None:
    if settings.rate_limit_per_second <= 0:
        return None
    # Unset burst: one second's worth of requests, so a sender at exactly the rate never waits.
    burst = settings.rate_limit_burst or max(1, math.ceil(settings.rate_limit_per_second))
    return RateLimiter(settings.rate_limit_per_second, burst)


def middlewares(settings: IngressSettings, limited_paths: Collection[str]) -> list[Middleware]:
    """The rate-limit middleware when the settings ask for one, else nothing.

    It must sit inside the problem middleware (so a 429 is problem+json and counted) and it
    runs before the body is read, so a refused request costs no body bytes. Only
    `limited_paths` are limited: probes and scrapes must keep working during a flood.
    """
    limiter = limiter_for(settings)
    if limiter is None:
        return []
    trust = settings.trust_forwarded_for
    paths = frozenset(limited_paths)

    @web.middleware
    async def rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in paths:
            wait = limiter.take(source_of(request, trust_forwarded_for=trust))
            if wait > 0:
                retry_after = max(1, math.ceil(wait))
                raise Problem(
                    429,
                    "rate-limited",
                    "Too many requests",
                    f"this source may send {limiter.rate:g} requests per second in bursts of "
                    f"{limiter.burst}; retry in {retry_after} s",
                    headers={"Retry-After": str(retry_after)},
                )
        return await handler(request)

    return [rate_limit]
