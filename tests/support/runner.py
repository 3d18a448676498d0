"""Running a consumer through the real Runner inside a test, and waiting on what it does."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from consumers.contract import Consumer, Delivery
from consumers.runner import Runner, RunnerSettings
from consumers.telemetry import RunnerMetrics
from core.kafkasettings import KafkaSettings
from schemas.codec import Decoder
from schemas.store import default_store


class Recorder(Consumer):
    """Remembers the call ids it was handed, in order."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def handle(self, batch: Sequence[Delivery]) -> None:
        self.seen += [d.report.call_id for d in batch]


@contextlib.asynccontextmanager
async def running(
    consumer: Consumer,
    kafka: KafkaSettings,
    group: str,
    registry: CollectorRegistry | None = None,
    **settings: Any,
) -> AsyncIterator[Runner]:
    """`consumer` in `group` on the test's topic until the block ends; then a clean stop
    (the batch in hand finishes and commits)."""
    runner = Runner(
        consumer,
        kafka,
        RunnerSettings(group_id=group, topic=kafka.topic, **settings),
        RunnerMetrics(registry or CollectorRegistry(), consumer.name),
        Decoder(default_store()),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        yield runner
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def eventually(
    predicate: Callable[[], bool] | Callable[[], Awaitable[bool]], timeout: float = 30.0
) -> None:
    """Poll `predicate` (plain or async) until it holds; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        outcome = predicate()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
