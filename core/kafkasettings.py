"""Kafka client settings shared by the ingress publisher and the consumer runner."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Self

from core.kafkasecurity import KafkaSecurity
from core.secret import Secret
from core.settings import EnvSettings, declared, setting, settings_class


@settings_class
class KafkaSettings(EnvSettings):
    # from_env(env, bootstrap_servers=<the local broker>) when the variable may be unset.
    bootstrap_servers: str = setting(
        "KAFKA_BOOTSTRAP_SERVERS",
        doc="Kafka brokers, host:port[,host:port]. Empty: `callstream run` starts a local "
        "KRaft broker; `callstream ingress` / `callstream consumer` refuse to start without one.",
    )
    topic: str = setting(
        "CALLSTREAM_TOPIC",
        default="flireo.end-of-call-report",
        doc="Topic the ingress writes end-of-call reports to and the consumers read.",
    )
    events_topic: str = setting(
        "CALLSTREAM_EVENTS_TOPIC",
        default="flireo.events",
        doc="Topic for the other Flireo events (status updates, ...).",
    )
    schema_registry_url: str | None = setting(
        "CALLSTREAM_SCHEMA_REGISTRY_URL",
        default=None,
        doc="Confluent-compatible schema registry (Karapace, Confluent, Apicurio "
        ".../apis/ccompat/v7). Empty: records carry the schema fingerprint (Avro single-object "
        "encoding), no registry.",
    )
    schema_registry_username: str | None = setting(
        "CALLSTREAM_SCHEMA_REGISTRY_USERNAME",
        default=None,
        doc="Basic auth user of the schema registry (Confluent Cloud: the registry API key).",
    )
    schema_registry_password: Secret | None = setting(
        "CALLSTREAM_SCHEMA_REGISTRY_PASSWORD",
        default=None,
        secret=True,
        doc="Basic auth password of the schema registry (Confluent Cloud: the API secret).",
    )
    schema_registry_cafile: Path | None = setting(
        "CALLSTREAM_SCHEMA_REGISTRY_CAFILE",
        default=None,
        doc="PEM file of the CA that signed the registry's certificate. Empty: the system's "
        "trust store.",
    )
    client_id: str = "callstream"
    partitions: int = setting(
        "CALLSTREAM_TOPIC_PARTITIONS",
        default=6,
        minimum=1,
        doc="Partitions of the topics callstream creates at start-up (existing topics are left "
        "alone). They cap how many instances of one consumer can work in parallel.",
    )
    replication_factor: int | None = setting(
        "CALLSTREAM_TOPIC_REPLICATION_FACTOR",
        default=None,
        minimum=1,
        doc="Replication factor of the topics callstream creates. Empty: 3, or the number of "
        "brokers if fewer.",
    )
    min_insync_replicas: int | None = setting(
        "CALLSTREAM_TOPIC_MIN_INSYNC_REPLICAS",
        default=None,
        minimum=1,
        doc="min.insync.replicas of the topics callstream creates: acks=all waits for this many. "
        "Empty: one less than the replication factor (at least 1).",
    )
    retention_ms: int | None = setting(
        "CALLSTREAM_TOPIC_RETENTION_MS",
        default=None,  # the broker's default (7 days on stock Kafka)
        minimum=-1,
        doc="retention.ms of the topics callstream creates (-1: forever). Empty: the broker's "
        "default.",
    )
    # Refused requests hold callers' numbers and transcripts: kept long enough to fix the
    # cause and reprocess, not for ever (docs/privacy.md).
    quarantine_retention_ms: int = setting(
        "CALLSTREAM_QUARANTINE_RETENTION_MS",
        default=30 * 24 * 3600 * 1000,
        minimum=-1,
        doc="retention.ms of the quarantine topic (<topic>.rejected) when callstream creates it "
        "(-1: forever). Default 30 days.",
    )

    security: KafkaSecurity = KafkaSecurity()

    @classmethod
    def from_env(cls, env: Mapping[str, str], **given: Any) -> Self:
        given.setdefault("security", KafkaSecurity.from_env(env))
        return super().from_env(env, **given)

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic}.dlq"

    @property
    def rejected_topic(self) -> str:
        """The quarantine: authenticated requests the ingress refused (schemas/rejected.py)."""
        return rejected_topic_of(self.topic)

    def client_kwargs(self) -> dict[str, Any]:
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            **self.security.client_kwargs(),
        }


# What the command checks before it decides to use (or start) the local broker instead.
BOOTSTRAP: Final = declared(KafkaSettings)["bootstrap_servers"]


def rejected_topic_of(topic: str) -> str:
    """The quarantine topic of a reports topic, for callers that have only its name."""
    return f"{topic}.rejected"
