"""`callstream consumer NAME`: one consumer service, its runner and its /metrics server."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Mapping

import aiohttp
from prometheus_client import CollectorRegistry

from consumers.catalog import lookup
from consumers.runner import Runner, RunnerSettings
from consumers.telemetry import RunnerMetrics
from core import heap
from core.kafkasettings import KafkaSettings
from core.opsserver import ops_server
from core.settings import EnvSettings, Setting, setting, settings_class
from schemas.codec import Decoder
from schemas.registry import registry_client
from schemas.store import default_store

log = logging.getLogger(__name__)


@settings_class
class ServiceSettings(EnvSettings):
    """What every consumer service reads besides its runner's and its consumer's settings."""

    host: str = setting(
        "CALLSTREAM_METRICS_HOST",
        default="0.0.0.0",  # noqa: S104 - scraped from outside
        doc="Address each consumer's /metrics and /healthz server listens on.",
    )


def port_setting(name: str) -> Setting:
    """CALLSTREAM_<NAME>_PORT: a variable per consumer, so that all run side by side on one
    host, each defaulting to the port its ConsumerSpec gives."""
    return Setting(
        f"CALLSTREAM_{name.upper().replace('-', '_')}_PORT",
        f"Port of the {name} consumer's /metrics and /healthz.",
        lookup(name).spec.default_metrics_port,
    )


async def run_consumer(
    name: str,
    env: Mapping[str, str],
    kafka: KafkaSettings,
    *,
    stop: asyncio.Event | None = None,
    runner_settings: RunnerSettings | None = None,
) -> int:
    spec = lookup(name).spec
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    registry = CollectorRegistry()
    heap.register(registry)
    consumer = spec.build(env, registry)
    settings = runner_settings or RunnerSettings.for_consumer(env, name, kafka)
    host = ServiceSettings.from_env(env).host
    port = port_setting(name).read(env, int)
    async with aiohttp.ClientSession() as session:
        runner = Runner(
            consumer,
            kafka,
            settings,
            RunnerMetrics(registry, name),
            Decoder(default_store(), registry_client(kafka, session)),
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
