"""`callstream consumers`: every registered consumer's group, its state, members and lag.

Also the read-only look at topics and groups that `callstream replay` plans with
(`KafkaInspector`). aiokafka ships no types, so its calls stay in here and in replay.py.

Lag is counted the way the consumer would meet it if it started now: per partition, the end
offset minus the committed offset; a partition without a commit (never consumed, or its
offsets expired) is read from the log start, so its lag is everything still retained.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, NamedTuple, Self, TextIO, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    CoordinatorLoadInProgressError,
    CoordinatorNotAvailableError,
    KafkaError,
    LeaderNotAvailableError,
    NotCoordinatorError,
    for_code,
)

from callstream.clihelp import table
from consumers.catalog import BUILT_IN, registered
from core.kafkasettings import KafkaSettings

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# A group with members or in a rebalance owns its offsets; only these two let anyone else
# commit for it (the broker refuses a non-member commit otherwise).
IDLE_STATES = frozenset({"Empty", "Dead"})

# Right after a broker starts, or after the coordinator moved, these clear within seconds.
_TRANSIENT = (
    CoordinatorNotAvailableError,
    CoordinatorLoadInProgressError,
    NotCoordinatorError,
    LeaderNotAvailableError,
)
_ATTEMPTS = 20
_UNKNOWN_TOPIC = 3  # UNKNOWN_TOPIC_OR_PARTITION


def default_group_id(consumer: str) -> str:
    """The group `callstream consumer NAME` joins unless CALLSTREAM_GROUP_ID says otherwise."""
    return f"callstream-{consumer}"


class TopicMissingError(Exception):
    """The topic does not exist (yet)."""


@dataclass(frozen=True, slots=True)
class GroupState:
    group_id: str
    state: str  # Stable, Empty, Dead, PreparingRebalance, CompletingRebalance
    members: int

    @property
    def active(self) -> bool:
        return self.members > 0 or self.state not in IDLE_STATES


@dataclass(frozen=True, slots=True)
class PartitionLag:
    partition: int
    beginning: int
    end: int
    committed: int | None

    @property
    def lag(self) -> int:
        # A commit below the log start (retention deleted what the group never read) resets
        # to the log start, like no commit at all.
        position = self.beginning if self.committed is None else self.committed
        return max(self.end - max(position, self.beginning), 0)


class Watched(NamedTuple):
    """A consumer `callstream consumers` reports on."""

    group_id: str
    description: str
    origin: str = BUILT_IN  # or the package that registered it, "name version"


@dataclass(frozen=True, slots=True)
class ConsumerStatus:
    name: str
    description: str
    topic: str
    group: GroupState
    partitions: tuple[PartitionLag, ...]
    origin: str = BUILT_IN

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "origin": self.origin,
            "group_id": self.group.group_id,
            "state": self.group.state,
            "members": self.group.members,
            "topic": self.topic,
            "lag": self.lag,
            "partitions": [asdict(p) | {"lag": p.lag} for p in self.partitions],
        }


class KafkaInspector:
    """Looks, never changes: an admin client and a consumer without a group."""

    def __init__(self, kafka: KafkaSettings) -> None:
        client = kafka.client_kwargs() | {"client_id": "callstream-inspector"}
        self._admin = AIOKafkaAdminClient(**client)
        self._reader = AIOKafkaConsumer(**client, group_id=None, enable_auto_commit=False)

    async def __aenter__(self) -> Self:
        try:
            await self._admin.start()
            await self._reader.start()
        except BaseException:
            # A client that failed to start still holds a connection pool to close.
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self._reader.stop()
        finally:
            await self._admin.close()

    async def partitions(self, topic: str) -> list[int]:
        """The topic's partitions; TopicMissingError if it does not exist."""

        async def lookup() -> list[int]:
            # Metadata for all topics: asking for this one by name would make a broker
            # with auto-creation create it, and looking must not change anything.
            for entry in await self._admin.describe_topics(None):
                if entry["topic"] != topic:
                    continue
                if entry["error_code"] == _UNKNOWN_TOPIC:
                    break
                if entry["error_code"]:
                    raise LeaderNotAvailableError(f"{topic}: error {entry['error_code']}")
                return sorted(int(p["partition"]) for p in entry["partitions"])
            raise TopicMissingError(f"topic {topic} does not exist")

        return await _retrying(lookup)

    async def log_offsets(
        self, topic: str, partitions: Iterable[int]
    ) -> tuple[dict[int, int], dict[int, int]]:
        """(log start, log end) per partition."""
        tps = [TopicPartition(topic, p) for p in partitions]
        if not tps:
            return {}, {}
        beginning = await _retrying(lambda: self._reader.beginning_offsets(tps))
        end = await _retrying(lambda: self._reader.end_offsets(tps))
        return (
            {tp.partition: int(o) for tp, o in beginning.items()},
            {tp.partition: int(o) for tp, o in end.items()},
        )

    async def offsets_for_time(
        self, topic: str, partitions: Iterable[int], moment: datetime
    ) -> dict[int, int | None]:
        """Per partition, the first offset whose record timestamp is at or after `moment`;
        None where no record is that new."""
        millis = max(int(moment.timestamp() * 1000), 0)
        query = {TopicPartition(topic, p): millis for p in partitions}
        if not query:
            return {}
        found = await _retrying(lambda: self._reader.offsets_for_times(dict(query)))
        return {tp.partition: None if hit is None else int(hit.offset) for tp, hit in found.items()}

    async def group(self, group_id: str) -> GroupState:
        async def describe() -> GroupState:
            for response in await self._admin.describe_consumer_groups([group_id]):
                for error_code, group, state, _ptype, _protocol, members in response.groups:
                    if group != group_id:
                        continue
                    if error_code:
                        # Coordinator moving or loading arrives here, not as an exception.
                        raise for_code(error_code)(f"describing group {group_id}")
                    return GroupState(group_id, str(state), len(members))
            return GroupState(group_id, "Dead", 0)

        return await _retrying(describe)

    async def committed(
        self, group_id: str, topic: str, partitions: Iterable[int]
    ) -> dict[int, int]:
        """The group's committed offsets on these partitions; those without one are left out."""
        wanted = [TopicPartition(topic, p) for p in partitions]
        if not wanted:
            return {}

        async def fetch() -> dict[int, int]:
            offsets = await self._admin.list_consumer_group_offsets(group_id, partitions=wanted)
            if set(offsets) != set(wanted):
                # A group-level error (coordinator moving or loading) comes back as an answer
                # without partitions, which aiokafka does not raise. Read as "no commits", it
                # would make a busy group look new.
                raise NotCoordinatorError(f"incomplete offsets for group {group_id}")
            return {tp.partition: int(m.offset) for tp, m in offsets.items() if m.offset >= 0}

        return await _retrying(fetch)

    async def existing(self, topic: str) -> list[int]:
        """The topic's partitions; none if it does not exist."""
        try:
            return await self.partitions(topic)
        except TopicMissingError:
            return []

    async def lags(self, group_id: str, topic: str) -> tuple[PartitionLag, ...]:
        partitions = await self.existing(topic)
        beginning, end = await self.log_offsets(topic, partitions)
        committed = await self.committed(group_id, topic, partitions)
        return tuple(PartitionLag(p, beginning[p], end[p], committed.get(p)) for p in partitions)


async def _retrying(call: Callable[[], Awaitable[_T]]) -> _T:
    delay = 0.1
    for _ in range(_ATTEMPTS - 1):
        try:
            return await call()
        except _TRANSIENT as exc:
            log.debug("kafka not ready (%s), retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
    return await call()  # the last attempt: its error is the caller's


async def consumer_statuses(
    kafka: KafkaSettings, consumers: Mapping[str, Watched]
) -> list[ConsumerStatus]:
    """`consumers`: by name, in the order to report them."""
    async with KafkaInspector(kafka) as inspector:
        out = []
        for name, watched in consumers.items():
            group = await inspector.group(watched.group_id)
            lags = await inspector.lags(watched.group_id, kafka.topic)
            out.append(
                ConsumerStatus(name, watched.description, kafka.topic, group, lags, watched.origin)
            )
        return out


def registered_consumers() -> dict[str, Watched]:
    return {
        name: Watched(default_group_id(name), found.spec.description, found.origin)
        for name, found in registered().items()
    }


def render_table(statuses: Iterable[ConsumerStatus]) -> str:
    rows = [("CONSUMER", "GROUP", "STATE", "MEMBERS", "LAG", "ORIGIN")]
    rows += [
        (s.name, s.group.group_id, s.group.state, str(s.group.members), str(s.lag), s.origin)
        for s in statuses
    ]
    return "\n".join(table(rows, right=(3, 4))) + "\n"


def render_json(statuses: Iterable[ConsumerStatus]) -> str:
    """JSON lines: one consumer per line, so `jq`, `grep` and a line-reading script all work."""
    return "".join(orjson.dumps(s.to_json()).decode() + "\n" for s in statuses)


async def consumers_command(
    kafka: KafkaSettings,
    out: TextIO,
    *,
    as_json: bool,
    consumers: Mapping[str, Watched] | None = None,
) -> int:
    try:
        statuses = await consumer_statuses(kafka, consumers or registered_consumers())
    except KafkaError as exc:
        sys.stderr.write(f"callstream consumers: Kafka at {kafka.bootstrap_servers}: {exc}\n")
        return 1
    out.write(render_json(statuses) if as_json else render_table(statuses))
    return 0
