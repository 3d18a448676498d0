"""Example consumer: forward each call's summary to a CRM's webhook.

This is the whole of a consumer, in a package of its own. Its pyproject.toml registers
`SPEC` under the `callstream.consumers` entry point, so once it is installed
(`pip install examples/crm-forward`), `callstream consumers` lists it and
`callstream consumer crm-forward` (or `callstream run`) runs it. Its consumer group is
`callstream-crm-forward`; a new group starts from the oldest record still on the topic, so it
backfills by itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiohttp
from prometheus_client import CollectorRegistry, Counter

from consumers.contract import Consumer, ConsumerSpec, Delivery
from consumers.errors import PermanentError, RetryableError
from core.settings import SettingsError


@dataclass(frozen=True)
class CrmSettings:
    url: str
    timeout_seconds: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> CrmSettings:
        url = env.get("CALLSTREAM_CRM_URL", "").strip()
        if not url:
            # SettingsError: callstream prints it as one line and exits 2.
            raise SettingsError("crm-forward needs CALLSTREAM_CRM_URL (the CRM's webhook URL)")
        return cls(url=url)


class CrmForward(Consumer):
    name = "crm-forward"

    def __init__(self, settings: CrmSettings, registry: CollectorRegistry) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._forwarded = Counter(
            "callstream_crm_forwarded_total", "Reports forwarded to the CRM.", registry=registry
        )

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._settings.timeout_seconds)
        self._session = aiohttp.ClientSession(timeout=timeout)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def handle(self, batch: Sequence[Delivery]) -> None:
        assert self._session is not None
        for delivery in batch:
            report = delivery.report
            body = {
                # The CRM dedupes on this key, which makes redelivery and replay harmless.
                "externalId": report.call_id,
                "occurredAt": report.event_time.isoformat(),
                "summary": report.summary,
                "candidateId": (report.user_metadata or {}).get("candidateId"),
            }
            try:
                async with self._session.put(self._settings.url, json=body) as resp:
                    if resp.status >= 500 or resp.status == 429:
                        raise RetryableError(f"CRM answered {resp.status}")
                    if resp.status >= 400:
                        raise PermanentError(f"CRM refused {report.call_id}: {resp.status}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise RetryableError(f"CRM unreachable: {exc}") from exc
            self._forwarded.inc()


def build(env: Mapping[str, str], registry: CollectorRegistry) -> CrmForward:
    return CrmForward(CrmSettings.from_env(env), registry)


# What the entry point names: how to build it, where its /metrics listens by default
# (CALLSTREAM_CRM_FORWARD_PORT overrides), and the line `callstream consumers` shows.
SPEC = ConsumerSpec(build, 9104, "summaries to the CRM")
