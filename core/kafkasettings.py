"""Kafka client settings shared by the ingress publisher and the consumer runner."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.settings import env_int, env_opt, env_str

DEFAULT_TOPIC = "flireo.end-of-call-report"
DEFAULT_EVENTS_TOPIC = "flireo.events"


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str
    topic: str = DEFAULT_TOPIC
    events_topic: str = DEFAULT_EVENTS_TOPIC
    schema_registry_url: str | None = None
    client_id: str = "callstream"
    # Partitions cap how many instances of one consumer can share the work.
    partitions: int = 6
    replication_factor: int = 1
    retention_ms: int | None = None  # None: the broker's default (7 days on stock Kafka)

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], *, bootstrap_servers: str | None = None
    ) -> KafkaSettings:
        """`bootstrap_servers`: the local broker, used when KAFKA_BOOTSTRAP_SERVERS is unset."""
        bootstrap = env_opt(env, "KAFKA_BOOTSTRAP_SERVERS") or bootstrap_servers
        if not bootstrap:
            raise ValueError("KAFKA_BOOTSTRAP_SERVERS is not set and no local broker was started")
        return cls(
            bootstrap_servers=bootstrap,
            topic=env_str(env, "CALLSTREAM_TOPIC", DEFAULT_TOPIC),
            events_topic=env_str(env, "CALLSTREAM_EVENTS_TOPIC", DEFAULT_EVENTS_TOPIC),
            schema_registry_url=env_opt(env, "CALLSTREAM_SCHEMA_REGISTRY_URL"),
            partitions=env_int(env, "CALLSTREAM_TOPIC_PARTITIONS", cls.partitions, minimum=1),
            replication_factor=env_int(
                env, "CALLSTREAM_TOPIC_REPLICATION_FACTOR", cls.replication_factor, minimum=1
            ),
            retention_ms=(
                env_int(env, "CALLSTREAM_TOPIC_RETENTION_MS", 0, minimum=-1)
                if env_opt(env, "CALLSTREAM_TOPIC_RETENTION_MS")
                else None
            ),
        )

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic}.dlq"

    def client_kwargs(self) -> dict[str, Any]:
        return {"bootstrap_servers": self.bootstrap_servers, "client_id": self.client_id}
