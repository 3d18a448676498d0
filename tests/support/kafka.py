"""The Kafka broker a pytest session runs against.

Two sources, one shape: if ``KAFKA_BOOTSTRAP_SERVERS`` is set the session uses that cluster
and starts nothing; otherwise it starts a real single-node KRaft broker
(:class:`callstream.localkafka.LocalKafka`) in a fresh home under the session's temp dir.
Either way the conftest gets a :class:`SessionBroker` whose ``bootstrap`` is the string to
hand to clients. ``local`` is the :class:`LocalKafka` only when this session owns the broker;
fault-injection tests (pause/kill/restart) call :meth:`SessionBroker.require_local`, which
fails them against an external cluster that is not ours to break.

Intended conftest use::

    @pytest.fixture(scope="session")
    def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SessionBroker]:
        with session_broker(tmp_path_factory.mktemp("kafka")) as broker:
            yield broker

    @pytest.fixture(scope="session")
    def kafka_bootstrap(kafka_broker: SessionBroker) -> str:
        return kafka_broker.bootstrap

The jars come from the shared cache (``$CALLSTREAM_CACHE_DIR``, default
``~/.cache/callstream``), so only the first session on a machine runs mvn.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from callstream.localkafka import LocalKafka
from core.kafkasettings import KafkaSettings

# Generous because a cold CI runner may also be compiling the JIT for everything else in the
# session; a healthy broker answers in a few seconds.
SESSION_START_TIMEOUT = 120.0


@dataclass(slots=True)
class SessionBroker:
    bootstrap: str
    local: LocalKafka | None

    def require_local(self) -> LocalKafka:
        if self.local is None:
            # Never a skip: a test that needs to break the broker fails when it cannot.
            pytest.fail("needs the session's own broker; KAFKA_BOOTSTRAP_SERVERS points elsewhere")
        return self.local

    def stop(self) -> None:
        if self.local is not None:
            self.local.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def session_broker(tmp_root: Path) -> SessionBroker:
    """Started and ready on return; ``stop()`` (or leaving the ``with``) ends a local broker."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if external:
        return SessionBroker(bootstrap=external, local=None)
    broker = LocalKafka(tmp_root / "kafka-home")
    return SessionBroker(bootstrap=broker.start(timeout=SESSION_START_TIMEOUT), local=broker)


@contextlib.contextmanager
def private_broker(home: Path) -> Iterator[LocalKafka]:
    """A broker of its own, for tests that kill or pause it (the session's is shared)."""
    local = LocalKafka(home)
    local.start(timeout=SESSION_START_TIMEOUT)
    try:
        yield local
    finally:
        local.stop()


def topics_on(local: LocalKafka, prefix: str) -> KafkaSettings:
    """Settings for the running broker `local`, with topics of their own."""
    status = local.status()
    assert status is not None
    assert status.bootstrap is not None
    suffix = uuid.uuid4().hex[:12]
    return KafkaSettings(
        bootstrap_servers=status.bootstrap,
        topic=f"{prefix}.{suffix}.end-of-call-report",
        events_topic=f"{prefix}.{suffix}.events",
    )
