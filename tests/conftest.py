"""Session-wide real dependencies: a KRaft broker (and a PostgreSQL server, lazily).

A missing dependency fails the run: nothing here skips.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner
from prometheus_client import CollectorRegistry

from callstream.localpg import PostgresServer
from core.kafkasettings import KafkaSettings
from core.secret import Secret
from ingress.app import RUNNER_OPTIONS, create_app
from ingress.server import IngressRunner
from ingress.settings import IngressSettings
from tests.support.kafka import SessionBroker, session_broker
from tests.support.pipeline import pipeline, receivers  # noqa: F401 - fixtures
from tests.support.samples import SAMPLE

TEST_SECRET = "whsec-test-0123456789"
Client = TestClient[web.Request, web.Application]


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SessionBroker]:
    with session_broker(tmp_path_factory.mktemp("kafka")) as broker:
        yield broker


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: SessionBroker) -> str:
    return kafka_broker.bootstrap


@pytest.fixture
def kafka(kafka_bootstrap: str) -> KafkaSettings:
    """Unique topics per test, so tests never see each other's records."""
    suffix = uuid.uuid4().hex[:12]
    return KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        topic=f"test.{suffix}.end-of-call-report",
        events_topic=f"test.{suffix}.events",
    )


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    # Not under pytest's basetemp: every new pytest session on the machine resets that tree
    # to 0700, which would lock the `postgres` user out of a running cluster.
    base = Path(tempfile.mkdtemp(prefix="callstream-pg-"))
    base.chmod(0o755)
    server = PostgresServer(base)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def sample_bytes() -> bytes:
    return SAMPLE.read_bytes()


@pytest.fixture
def ingress_settings(kafka: KafkaSettings) -> IngressSettings:
    return IngressSettings(
        kafka=kafka,
        host="127.0.0.1",
        port=0,
        webhook_secrets=(Secret(TEST_SECRET),),
        publish_timeout_seconds=10.0,
    )


class IngressTestServer(TestServer):
    """A test server running the app as `callstream ingress` does (ingress.server)."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return IngressRunner(self.app, **kwargs)


async def start_ingress(
    settings: IngressSettings, registry: CollectorRegistry | None = None
) -> Client:
    app = create_app(settings, registry=registry)
    server = IngressTestServer(app)
    # TestServer drops constructor options; start_server is where they reach the runner.
    await server.start_server(**RUNNER_OPTIONS)
    client: Client = TestClient(server)
    await client.start_server()
    return client


async def wait_drained(client: Client, timeout: float = 90.0) -> dict[str, Any]:
    """Wait until every acknowledged report is on Kafka: a 202 may also mean "in the
    spool" (Kafka slow to acknowledge, or not connected yet)."""
    deadline = time.monotonic() + timeout
    while True:
        state: dict[str, Any] = await (await client.get("/readyz")).json()
        if state["spool"]["records"] == 0 and state["durable"] == "kafka":
            return state
        assert time.monotonic() < deadline, f"spool never drained: {state}"
        await asyncio.sleep(0.2)


@pytest.fixture
async def ingress(ingress_settings: IngressSettings) -> AsyncIterator[Client]:
    client = await start_ingress(ingress_settings)
    try:
        yield client
    finally:
        await client.close()
