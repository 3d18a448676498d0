"""Stopping the runner when the broker went away while a batch was being handled."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator, Sequence

import pytest

from callstream.localkafka import LocalKafka
from consumers.contract import Consumer, Delivery
from tests.support.kafka import private_broker, topics_on
from tests.support.produce import produce_reports, sample_report
from tests.support.runner import running


@pytest.fixture
def lone_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    with private_broker(tmp_path_factory.mktemp("runner-stop-kafka") / "home") as local:
        yield local


class Gated(Consumer):
    """Holds its first batch until the test lets it go."""

    name = "gated"

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.handled = 0

    async def handle(self, batch: Sequence[Delivery]) -> None:
        self.entered.set()
        await self.gate.wait()
        self.handled += len(batch)


async def test_a_stop_does_not_wait_for_a_commit_the_gone_broker_cannot_take(
    lone_broker: LocalKafka,
) -> None:
    kafka = topics_on(lone_broker, "stop")
    await produce_reports(kafka, [sample_report()])
    consumer = Gated()
    # Leaving the block stops the runner and gives it 30 s to return; aiokafka alone
    # would retry the commit until the broker came back.
    async with running(consumer, kafka, "g-stop-gone"):
        await asyncio.wait_for(consumer.entered.wait(), 60)
        lone_broker.kill(signal.SIGKILL)
        consumer.gate.set()
        await asyncio.sleep(1.0)  # the commit is now knocking on a closed door
    assert consumer.handled == 1
