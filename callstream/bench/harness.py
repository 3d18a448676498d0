"""What the bench's phases stand on: the run's broker, PostgreSQL and child processes
(each stopped however the run ends), their environment, and reading their /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import aiohttp

from callstream.bench import pool
from callstream.bench.options import BenchOptions
from callstream.bench.procstat import Watched
from callstream.bench.report import Results
from callstream.bench.services import HOST, Measured, Service, run_measured, say
from callstream.localkafka import KAFKA_VERSION, LocalKafka
from callstream.localpg import PostgresServer
from callstream.ports import free_port
from core.kafkasettings import KafkaSettings
from core.signing import WEBHOOK_PATH
from core.topicadmin import ensure_topics

# A fresh secret per run: the bench's requests are signed exactly as Flireo signs them.
SECRET = f"bench-{uuid.uuid4().hex}"
PARTITIONS = 6
WRK_TIMEOUT = "10s"
_STARTUP_TIMEOUT = 60.0
# The bench reads /metrics ten times a second while a consumer works: gzip'd, as a client
# asks for by default, each read cost the consumer a compression on a worker thread (6% of
# its CPU samples in a PostgreSQL catch-up), which the figures then blamed on the consumer.
_UNCOMPRESSED: Final = {"Accept-Encoding": "identity"}


class Harness:
    broker: Watched  # set by start_broker, which runs before every phase

    def __init__(
        self, options: BenchOptions, tmp: Path, http: aiohttp.ClientSession, out_prefix: Path
    ) -> None:
        self.o = options
        self.out_prefix = out_prefix
        self.tmp = tmp
        self.http = http
        # Everything this run started, stopped in reverse order however the run ends.
        self.services: list[Service] = []
        self.kafka: LocalKafka | None = None
        self.postgres: PostgresServer | None = None
        self.bootstrap = ""
        self.started = time.monotonic()
        self.results = Results(meta={})
        self.short, self.long = pool.templates(options.sample)

    def say(self, message: str) -> None:
        say(f"[{time.monotonic() - self.started:5.0f}s] {message}")

    # -- what runs ----------------------------------------------------------------------------

    async def start_broker(self) -> None:
        self.say(f"starting a Kafka {KAFKA_VERSION} broker (KRaft) in {self.tmp / 'kafka'}")
        self.kafka = LocalKafka(self.tmp / "kafka")
        self.bootstrap = await asyncio.to_thread(self.kafka.start, 120.0)
        status = self.kafka.status()
        assert status is not None
        self.broker = Watched("broker", status.pid)

    async def close(self) -> None:
        for service in reversed(self.services):
            await asyncio.to_thread(service.stop)
        self.services.clear()
        if self.postgres is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.postgres.stop)
            self.postgres = None
        if self.kafka is not None:
            await asyncio.to_thread(self.kafka.stop)
            self.kafka = None

    def _env(self, **extra: str) -> dict[str, str]:
        # Nothing from the caller's environment may redirect a child to another broker or
        # database, or change its behaviour (CALLSTREAM_RATE_LIMIT_PER_SECOND, say).
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSTREAM_", "KAFKA_"))}
        env |= {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "CALLSTREAM_WEBHOOK_SECRET": SECRET,
            "CALLSTREAM_LOG_LEVEL": "WARNING",
            "CALLSTREAM_METRICS_HOST": HOST,
            "CALLSTREAM_HOME": str(self.tmp / "home"),
            "CALLSTREAM_TOPIC_PARTITIONS": str(PARTITIONS),
            # wrk cannot sign, so its pool repeats signed requests: with replay detection on,
            # all but the first of each would be answered from memory, not published.
            "CALLSTREAM_REPLAY_DETECTION": "false",
        }
        if self.o.pythonpath is not None:
            env["PYTHONPATH"] = str(self.o.pythonpath.resolve())
        return env | dict(self.o.env) | extra

    def _spawn(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str],
        port: int,
        log: str = "",
        *,
        tree: bool = False,
    ) -> Service:
        service = Service(name, argv, env, self.tmp / f"{log or name}.log", port, tree=tree)
        service.start()
        self.services.append(service)
        return service

    async def _stop(self, service: Service) -> None:
        await asyncio.to_thread(service.stop)
        self.services.remove(service)

    async def _wait_http(self, service: Service, path: str) -> None:
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while True:
            if (code := service.poll()) is not None:
                raise RuntimeError(
                    f"{service.name} exited with {code} while starting:\n{service.log_tail()}"
                )
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with self.http.get(service.url + path) as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{service.name} did not answer {path}:\n{service.log_tail()}")
            await asyncio.sleep(0.05)

    async def _metrics(self, service: Service) -> list[str]:
        async with self.http.get(service.url + "/metrics", headers=_UNCOMPRESSED) as resp:
            return (await resp.text()).splitlines()

    async def _metric(self, service: Service, series: str) -> float | None:
        for line in await self._metrics(service):
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    async def _histogram(self, service: Service, name: str) -> dict[float, float]:
        """A Prometheus histogram's cumulative bucket counts, by upper bound in seconds."""
        buckets: dict[float, float] = {}
        for line in await self._metrics(service):
            if line.startswith(name + "_bucket{"):
                bound = line.split('le="', 1)[1].split('"', 1)[0]
                buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
        return buckets

    async def _bench_count(self, service: Service) -> float:
        async with self.http.get(service.url + "/bench-count") as resp:
            return float(await resp.text())

    async def _ensure_topic(self, topic: str) -> None:
        settings = KafkaSettings(self.bootstrap, topic=topic, partitions=PARTITIONS)
        await ensure_topics(settings, [topic])

    async def start_ingress(self, topic: str, *, workers: int = 1, **env: str) -> Service:
        """`callstream ingress` with `workers` processes (one unless a phase measures more:
        the profile and spool phases look at one pid)."""
        port = free_port()
        name = f"ingress-{topic.removeprefix('bench.')}"
        service = self._spawn(
            "ingress",
            [sys.executable, "-m", "callstream", "ingress"],
            self._env(
                CALLSTREAM_INGRESS_HOST=HOST,
                CALLSTREAM_INGRESS_PORT=str(port),
                CALLSTREAM_TOPIC=topic,
                CALLSTREAM_EVENTS_TOPIC=f"{topic}.events",
                CALLSTREAM_SPOOL_DIR=str(self.tmp / f"spool-{name}"),
                CALLSTREAM_INGRESS_WORKERS=str(workers),
                **env,
            ),
            port,
            log=name,
            tree=workers > 1,
        )
        await self._wait_http(service, "/readyz")
        return service

    async def start_baseline(self, kind: str) -> Service:
        port = free_port()
        argv = [sys.executable, "-m", "callstream.bench.baselines", kind, "--port", str(port)]
        if kind == "naive":
            await self._ensure_topic("bench.naive")
            argv += ["--bootstrap", self.bootstrap, "--topic", "bench.naive"]
        service = self._spawn(kind, argv, self._env(), port)
        await self._wait_http(service, "/bench-count")
        return service

    def _consumer(self, topic: str, group: str, database: Mapping[str, str]) -> Service:
        port = free_port()
        return self._spawn(
            "consumer",
            [sys.executable, "-m", "callstream", "consumer", "storage"],
            self._env(
                CALLSTREAM_TOPIC=topic,
                CALLSTREAM_GROUP_ID=group,
                CALLSTREAM_STORAGE_PORT=str(port),
                **database,
            ),
            port,
        )

    # -- closed loop: wrk ---------------------------------------------------------------------

    async def _wrk(self, script: Path, port: int, seconds: float, connections: int) -> Measured:
        argv = [
            "wrk",
            f"-t{self.o.threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            f"--timeout={WRK_TIMEOUT}",
            "-s",
            str(script),
            f"http://{HOST}:{port}{WEBHOOK_PATH}",
        ]
        return await asyncio.to_thread(run_measured, argv)

    async def _warm_up(self, script: Path, port: int) -> None:
        if self.o.warmup > 0:
            await self._wrk(script, port, self.o.warmup, min(32, self.o.connections))

    def _mixed(
        self, long: pool.BodyTemplate, long_every: int, count: int, port: int
    ) -> list[pool.SignedRequest]:
        return pool.mixed_requests(
            self.short, long, count, long_every=long_every, secret=SECRET, host=f"{HOST}:{port}"
        )

    def _wrk_script(self, name: str, template: pool.BodyTemplate, port: int) -> Path:
        # Enough distinct call ids that a run cycles through each a few dozen times at most.
        size = 4096 if template.size < 10_000 else 256
        requests = pool.signed_requests(template, size, secret=SECRET, host=f"{HOST}:{port}")
        return pool.write_wrk_script(self.tmp / f"wrk-{name}-{template.size}.lua", requests)
