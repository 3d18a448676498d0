"""Run the ingress until SIGTERM/SIGINT, then stop accepting, finish in-flight requests
and flush the producer."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from ingress.app import RUNNER_OPTIONS, SETTINGS, create_app
from ingress.hygiene import ConnectionLimits, GuardedServer
from ingress.settings import IngressSettings
from ingress.sharedreplays import TABLE_ENV

log = logging.getLogger(__name__)

# In-flight requests get this long to finish once shutdown starts.
SHUTDOWN_GRACE_SECONDS = 15.0
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PARENT_ENV = "CALLSTREAM_INGRESS_PARENT_PID"


@dataclass(frozen=True)
class WorkerLink:
    """What a worker shares with its siblings and its parent (ingress/workers.py), handed
    down in its environment."""

    metrics_dir: Path
    replay_table: Path
    # Known from before the worker started, so a parent that dies at any moment is noticed,
    # even while the worker is still starting.
    parent_pid: int

    def env(self) -> dict[str, str]:
        return {
            MULTIPROC_ENV: str(self.metrics_dir),
            TABLE_ENV: str(self.replay_table),
            PARENT_ENV: str(self.parent_pid),
        }

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerLink:
        names = (MULTIPROC_ENV, TABLE_ENV, PARENT_ENV)
        if not all(env.get(name) for name in names):
            raise SystemExit(f"--worker is for the ingress's own workers ({', '.join(names)})")
        return cls(Path(env[MULTIPROC_ENV]), Path(env[TABLE_ENV]), int(env[PARENT_ENV]))


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
    worker: WorkerLink | None = None,
) -> None:
    """`worker` set: this process is one of several (ingress/workers.py) that share the port
    (SO_REUSEPORT), their metrics and their memory of recent deliveries."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    orphaned = None
    if worker is not None:
        # Watched from before the set-up, which may wait up to 40 s for the spool's lock.
        orphaned = asyncio.create_task(
            _stop_when_orphaned(stop, worker.parent_pid), name="parent-watch"
        )
    app = create_app(
        settings,
        metrics_dir=None if worker is None else worker.metrics_dir,
        replay_table=None if worker is None else worker.replay_table,
    )
    runner = IngressRunner(app, shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
    try:
        await runner.setup()
        # Only workers share the port: a lone ingress must still fail on a port already taken.
        site = web.TCPSite(
            runner, settings.host, settings.port, backlog=1024, reuse_port=worker is not None
        )
        await site.start()
        log.info("ingress listening on http://%s:%d", settings.host, settings.port)
        await stop.wait()
        log.info("shutting down: finishing in-flight requests, flushing the producer")
    finally:
        if orphaned is not None:
            orphaned.cancel()
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _stop_when_orphaned(stop: asyncio.Event, parent: int) -> None:
    """A worker whose parent died (SIGKILL leaves no time to stop it) stops too, rather than
    hold the port and a spool directory with nobody to restart or stop it."""
    while True:
        if os.getppid() != parent:
            break
        await asyncio.sleep(1.0)
    log.warning("the ingress's parent process is gone: stopping this worker")
    stop.set()
