"""Outgoing HTTP for alerts, guarded against server-side request forgery.

Outgoing HTTP never reaches private, loopback, link-local, multicast, reserved or
unspecified addresses unless `allowed_networks` lists them. The check runs on the
addresses the connection will actually use: host names go through `GuardedResolver`
(aiohttp connects only to the addresses a resolver returns, so a rebinding DNS answer is
checked, not trusted), IP literals are checked before the request, and redirects are
followed by hand, re-checking every hop.
"""

from __future__ import annotations

import email.utils
import ipaddress
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, TypeAlias

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from consumers.alerting.errors import DeliveryFailure

MAX_REDIRECTS: Final = 3
# Every redirect re-sends the same POST (browsers turn 301/302/303 into a GET, which would
# deliver an empty alert); each hop is checked like the first and the signature is fresh.
_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
USER_AGENT: Final = "callstream-alerting/1"

# ipaddress's is_* properties, in the order a refusal names the first that applies.
_REFUSED: Final = ("loopback", "link_local", "multicast", "unspecified", "reserved", "private")

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
        for part in filter(None, (entry.strip() for entry in (text or "").split(","))):
            try:
                networks.append(ipaddress.ip_network(part, strict=False))
            except ValueError as exc:
                raise ValueError(f"{part!r} is not a CIDR network: {exc}") from None
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
        for kind in _REFUSED:
            if getattr(target, f"is_{kind}"):
                return f"{address} is {kind.replace('_', '-')}"
        if not target.is_global:
            return f"{address} is not a public address"
        return None

    def check(self, address: str) -> None:
        parsed = _ip_address(address)
        if parsed is None:
            raise DestinationRefused(f"{address!r} is not an IP address")
        reason = self.refusal(parsed)
        if reason is not None:
            raise DestinationRefused(reason)


def _ip_address(text: str) -> IPAddress | None:
    """The address `text` spells (an IPv6 zone suffix ignored), or None for a host name."""
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


class GuardedResolver(AbstractResolver):
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
        # aiohttp skips the resolver for IP literals, so they are checked here; a name is
        # checked by GuardedResolver, on what it resolves to.
        if _ip_address(url.host) is not None:
            self._policy.check(url.host)

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
                raise DeliveryFailure.timed_out(f"no answer within {timeout:g}s")
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
                raise DeliveryFailure.timed_out(
                    f"{host} did not answer within {timeout:g}s"
                ) from exc
            except aiohttp.InvalidURL as exc:
                raise DeliveryFailure("client_error", "invalid URL", permanent=True) from exc
            except aiohttp.ClientError as exc:
                raise DeliveryFailure.unreachable(host, exc) from exc
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
