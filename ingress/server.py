"""Run the ingress until SIGTERM/SIGINT, then stop accepting, finish in-flight requests
and flush the producer."""

from __future__ import annotations

import asyncio
import logging
import signal
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


async def serve(settings: IngressSettings, *, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = IngressRunner(create_app(settings), shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
    await site.start()
    log.info("ingress listening on http://%s:%d", settings.host, settings.port)
    try:
        await stop.wait()
        log.info("shutting down: finishing in-flight requests, flushing the producer")
    finally:
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
