"""What a consumer is: a name, settings from the environment, and an async batch handler.

A consumer never touches Kafka. The runner hands it decoded reports in batches and commits
their offsets only after `handle` returns. Handlers must be idempotent: after a crash or a
rebalance the same report can arrive again, and replays send old reports on purpose.

A consumer that also wants the other Flireo events (status updates, ...) says so with
`reads_events`: the runner then subscribes its group to the events topic too and hands
those records, decoded, to `handle_events`, on the same terms.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from prometheus_client import CollectorRegistry

from schemas.events import FlireoEvent
from schemas.report import CallReport

#: A record carrying this header was put back on the topic by `callstream dlq redrive` for
#: the one consumer it names; every other consumer passes over it (it already handled it).
REDRIVE_HEADER = "redrive-for"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One report and where it came from."""

    report: CallReport
    topic: str
    partition: int
    offset: int
    value: bytes  # the record exactly as it sits on the topic (Avro, framed)


@dataclass(frozen=True, slots=True)
class EventDelivery:
    """One record of the events topic and where it came from."""

    event: FlireoEvent
    topic: str
    partition: int
    offset: int
    value: bytes


class Consumer(ABC):
    #: one name everywhere: module, catalog key, CLI argument, consumer group, metric label
    name: str
    #: True: the runner also reads the events topic for this consumer (`handle_events`)
    reads_events: ClassVar[bool] = False

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections, run migrations. Called once before the first batch."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Close what `start` opened. Called once after the last commit."""

    @abstractmethod
    async def handle(self, batch: Sequence[Delivery]) -> None:
        """Handle a batch; raise RetryableError or PermanentError (consumers.errors)."""

    async def handle_events(self, batch: Sequence[EventDelivery]) -> None:
        """Handle a batch of the events topic, as `handle`; only called if `reads_events`."""
        raise NotImplementedError(f"{self.name} does not read the events topic")


# How a service builds its consumer: settings parsed once from the environment, metrics
# registered on the service's own Prometheus CollectorRegistry.
ConsumerFactory = Callable[[Mapping[str, str], CollectorRegistry], Consumer]


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    build: ConsumerFactory
    #: where its /metrics and /healthz listen unless CALLSTREAM_METRICS_PORT says otherwise
    default_metrics_port: int
    description: str
    #: its settings class (core.settings), whose variables .env.example lists
    settings: type | None = None
