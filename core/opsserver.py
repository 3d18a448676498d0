"""The small HTTP server each consumer service runs beside its work: /metrics and /healthz."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler


@asynccontextmanager
async def ops_server(
    host: str, port: int, registry: CollectorRegistry, healthy: Callable[[], dict[str, object]]
) -> AsyncIterator[int]:
    """Serve until the block exits; yields the bound port (useful with port 0)."""

    async def healthz(request: web.Request) -> web.Response:
        state = healthy()
        return web.json_response(state, status=200 if state.get("ok") else 503)

    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    try:
        yield int(runner.addresses[0][1]) if port == 0 else port
    finally:
        await runner.cleanup()
