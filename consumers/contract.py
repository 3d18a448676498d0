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
from dataclasses import FrozenInstanceError, dataclass
from typing import Any, ClassVar

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


class DecodedDelivery(Delivery):
    """A Delivery as the runner hands it out: `report` is built from the decoded Avro
    record the first time a consumer reads it, so a consumer that works from `record`
    itself (storage writes its columns straight from it) never pays for the report.

    The runner has checked that `record` forms a report (`schemas.report.check_record`).
    A copy made with `dataclasses.replace` is given its report and no record: the report
    may be the thing that was replaced.
    """

    __slots__ = ("record",)

    def __init__(
        self,
        report: CallReport | None = None,
        topic: str = "",
        partition: int = 0,
        offset: int = 0,
        value: bytes = b"",
        *,
        record: dict[str, Any] | None = None,
    ) -> None:
        if (report is None) == (record is None):
            raise TypeError("a DecodedDelivery needs a report or a record, not both")
        if report is not None:
            _REPORT_SLOT.__set__(self, report)
        object.__setattr__(self, "topic", topic)
        object.__setattr__(self, "partition", partition)
        object.__setattr__(self, "offset", offset)
        object.__setattr__(self, "value", value)
        #: the report as the current schema's Avro record (JSON fields as JSON text)
        self.record: dict[str, Any] | None
        object.__setattr__(self, "record", record)

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    @property
    def report(self) -> CallReport:
        try:
            return _REPORT_SLOT.__get__(self, Delivery)  # type: ignore[no-any-return]
        except AttributeError:
            assert self.record is not None
            report = CallReport.from_record(self.record)
            _REPORT_SLOT.__set__(self, report)
            return report


# Delivery's own storage for `report`, which DecodedDelivery's property fills on first use.
_REPORT_SLOT: Any = Delivery.__dict__["report"]


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
