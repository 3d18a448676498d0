"""Run the ingress until SIGTERM/SIGINT, then stop accepting, finish in-flight requests
and flush the producer."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

from aiohttp import web

from ingress.app import RUNNER_OPTIONS, SETTINGS, create_app
from ingress.hygiene import ConnectionLimits, GuardedServer
from ingress.settings import IngressSettings

log = logging.getLogger(__name__)

# In-flight requests get this long to finish once shutdown starts.
SHUTDOWN_GRACE_SECONDS = 15.0


class IngressRunner(web.AppRunner):
    """The runner of an app from create_app: its options, its settings' keep-alive, and
    connections guarded by ingress/hygiene.py (header deadline, connection cap)."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        settings = app[SETTINGS]
        options = RUNNER_OPTIONS | {"keepalive_timeout": settings.keepalive_timeout_seconds}
        super().__init__(app, **(options | kwargs))
        self.limits = ConnectionLimits(settings.header_timeout_seconds, settings.max_connections)

    async def _make_server(self) -> web.Server:
        return GuardedServer(await super()._make_server(), self.limits)


async def serve(
    settings: IngressSettings,
    *,
    stop: asyncio.Event | None = None,
    metrics_dir: Path | None = None,
    replay_table: Path | None = None,
) -> None:
    """`metrics_dir` set: this process is one of several workers (ingress/workers.py) that
    share the port (SO_REUSEPORT), their metrics and `replay_table`, their memory of recent
    deliveries."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = create_app(settings, metrics_dir=metrics_dir, replay_table=replay_table)
    runner = IngressRunner(app, shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
    await runner.setup()
    # Only workers share the port: a lone ingress must still fail on a port already taken.
    site = web.TCPSite(
        runner, settings.host, settings.port, backlog=1024, reuse_port=metrics_dir is not None
    )
    await site.start()
    log.info("ingress listening on http://%s:%d", settings.host, settings.port)
    orphaned = None
    if metrics_dir is not None:
        orphaned = asyncio.create_task(_stop_when_orphaned(stop), name="parent-watch")
    try:
        await stop.wait()
        log.info("shutting down: finishing in-flight requests, flushing the producer")
    finally:
        if orphaned is not None:
            orphaned.cancel()
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    """A worker whose parent died (SIGKILL leaves no time to stop it) stops too, rather than
    hold the port and a spool directory with nobody to restart or stop it."""
    parent = os.getppid()
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != parent:
            break
    log.warning("the ingress's parent process is gone: stopping this worker")
    stop.set()
