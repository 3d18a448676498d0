"""Creating callstream's topics up front, with the configured partitions, replication and
retention, and saying how durable an existing topic is.

Relying on broker auto-creation would leave the partition count and retention to broker
defaults, and a consumer subscribed before the first report would not see the topic until
its next metadata refresh. Unless configured, a topic gets three replicas (or as many as
there are brokers) and min.insync.replicas one less: acks=all then means "on two brokers",
and one broker may fail without refusing writes.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from core.kafkasettings import KafkaSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Durability:
    """How an existing topic keeps what acks=all acknowledged."""

    topic: str
    brokers: int
    replication_factor: int
    min_insync_replicas: int
    under_replicated: int  # partitions whose in-sync replicas are fewer than their replicas

    def weakness(self) -> str | None:
        """Why an acknowledged write could be lost, when it could; None when it cannot
        (or on a single broker, where nothing better is possible)."""
        if self.brokers <= 1:
            return None
        if self.replication_factor == 1:
            return f"{self.topic} has 1 replica on a cluster of {self.brokers} brokers"
        if self.min_insync_replicas <= 1:
            return (
                f"{self.topic} has min.insync.replicas={self.min_insync_replicas}: acks=all is"
                " satisfied by one broker, which can fail before it replicates"
            )
        return None


def replication_for(kafka: KafkaSettings, brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) for a topic callstream creates."""
    replicas = kafka.replication_factor or min(3, max(1, brokers))
    return replicas, kafka.min_insync_replicas or max(1, replicas - 1)


async def ensure_topics(kafka: KafkaSettings, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(**kafka.client_kwargs() | {"client_id": "callstream-admin"})
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [name for name in names if name not in existing]
        if missing:
            await _create(admin, kafka, missing)
        await _until_led(admin, names)
    finally:
        await admin.close()


async def _create(admin: AIOKafkaAdminClient, kafka: KafkaSettings, names: list[str]) -> None:
    replicas, min_isr = replication_for(kafka, len((await admin.describe_cluster())["brokers"]))
    missing = [
        NewTopic(
            name, kafka.partitions, replicas, topic_configs=topic_configs(kafka, name, min_isr)
        )
        for name in names
    ]
    response = await admin.create_topics(missing)
    for name, code, *_ in getattr(response, "topic_errors", []):
        if code not in (0, TopicAlreadyExistsError.errno):
            raise KafkaError(f"creating topic {name} failed with error code {code}")
    log.info(
        "created topics %s (%d replicas, min.insync.replicas %d)",
        ", ".join(names),
        replicas,
        min_isr,
    )


LEADERS_WAIT_SECONDS = 30.0


async def _until_led(admin: AIOKafkaAdminClient, names: list[str]) -> None:
    """Return once every partition of every topic has a leader in the metadata (or after
    LEADERS_WAIT_SECONDS). A topic another process created a moment ago is listed before
    its partitions are: a consumer that subscribed then would be assigned none of them,
    and not look again until its metadata is refreshed, minutes later."""
    deadline = asyncio.get_running_loop().time() + LEADERS_WAIT_SECONDS
    while True:
        topics = await admin.describe_topics(names)
        if all(
            t["error_code"] == 0
            and t["partitions"]
            and all(p["leader"] >= 0 for p in t["partitions"])
            for t in topics
        ) and {t["topic"] for t in topics} >= set(names):
            return
        if asyncio.get_running_loop().time() >= deadline:
            log.warning("topics %s have partitions without a leader yet", ", ".join(names))
            return
        await asyncio.sleep(0.1)


def topic_configs(kafka: KafkaSettings, name: str, min_insync_replicas: int) -> dict[str, str]:
    """The quarantine is keyed by request id and compacted as well as deleted: the latest record
    per request id is its state, and an erasure's tombstone removes the kept body for good
    once the log cleaner has passed (and at the latest when retention deletes the segment).
    """
    configs = {"min.insync.replicas": str(min_insync_replicas)}
    if name == kafka.rejected_topic:
        configs["cleanup.policy"] = "compact,delete"
        configs["retention.ms"] = str(kafka.quarantine_retention_ms)
    elif kafka.retention_ms is not None:
        configs["retention.ms"] = str(kafka.retention_ms)
    return configs


@dataclass(frozen=True, slots=True)
class ClusterView:
    brokers: list[int]
    controller: int | None
    topics: list[Durability]  # those of the asked-for topics that exist


async def describe(kafka: KafkaSettings, topics: list[str]) -> ClusterView:
    admin = AIOKafkaAdminClient(**kafka.client_kwargs() | {"client_id": "callstream-admin"})
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
        brokers = sorted(int(b["node_id"]) for b in cluster["brokers"])
        existing = set(await admin.list_topics())
        found = [t for t in topics if t in existing]
        views = []
        for described in await admin.describe_topics(found) if found else []:
            name, partitions = described["topic"], described["partitions"]
            [config] = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, name, {"min.insync.replicas": None})]
            )
            entries = config.resources[0][4]
            views.append(
                Durability(
                    topic=name,
                    brokers=len(brokers),
                    replication_factor=min((len(p["replicas"]) for p in partitions), default=0),
                    min_insync_replicas=next(int(e[1]) for e in entries),
                    under_replicated=sum(len(p["isr"]) < len(p["replicas"]) for p in partitions),
                )
            )
        controller = cluster.get("controller_id")
        return ClusterView(brokers, None if controller in (None, -1) else int(controller), views)
    finally:
        await admin.close()
