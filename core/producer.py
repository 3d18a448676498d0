"""The one way callstream builds a Kafka producer that must not lose or duplicate records.

acks=all: a send resolves only once every in-sync replica holds the record. Idempotence: the
producer's own retries can neither duplicate nor reorder records within a partition. The
ingress, the runner's dead-letter path, replay and the dead-letter re-drive all promise
"durable once acknowledged", so they all build their producer here and add only tuning.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaProducer

from core.kafkasettings import KafkaSettings


def durable_producer(kafka: KafkaSettings, client_id: str, **tuning: Any) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **kafka.client_kwargs() | {"client_id": client_id},
        acks="all",
        enable_idempotence=True,
        **tuning,
    )
