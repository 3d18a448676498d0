"""`callstream consumer NAME`: one consumer service, its runner and its /metrics server."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Mapping

import aiohttp
from prometheus_client import CollectorRegistry

from consumers.registry import CONSUMERS
from consumers.runner import Runner, RunnerSettings
from consumers.runner_metrics import RunnerMetrics
from core.kafkasettings import KafkaSettings
from core.opsserver import ops_server
from core.settings import env_int, env_str
from schemas.codec import Decoder
from schemas.registry import RegistryClient
from schemas.store import default_store

log = logging.getLogger(__name__)


async def run_consumer(
    name: str,
    env: Mapping[str, str],
    kafka: KafkaSettings,
    *,
    stop: asyncio.Event | None = None,
    runner_settings: RunnerSettings | None = None,
) -> int:
    spec = CONSUMERS.get(name)
    if spec is None:
        known = ", ".join(sorted(CONSUMERS))
        raise SystemExit(f"no consumer named {name!r}; registered: {known}")
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    registry = CollectorRegistry()
    consumer = spec.build(env, registry)
    settings = runner_settings or RunnerSettings.from_env(env, name, kafka)
    host = env_str(env, "CALLSTREAM_METRICS_HOST", "0.0.0.0")  # noqa: S104 - scraped from outside
    port = env_int(
        env, f"CALLSTREAM_{name.upper().replace('-', '_')}_PORT", spec.default_metrics_port
    )
    async with aiohttp.ClientSession() as session:
        registry_client = (
            RegistryClient(kafka.schema_registry_url, session)
            if kafka.schema_registry_url
            else None
        )
        runner = Runner(
            consumer,
            kafka,
            settings,
            RunnerMetrics(registry, name),
            Decoder(default_store(), registry_client),
        )

        def health() -> dict[str, object]:
            return {"ok": runner.running, "consumer": name, "group": settings.group_id}

        async with ops_server(host, port, registry, health) as bound:
            log.info(
                "consumer %s (group %s) serving /metrics on :%d", name, settings.group_id, bound
            )
            await runner.run(stop)
    log.info("consumer %s stopped cleanly", name)
    return 0
