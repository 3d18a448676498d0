"""Creating callstream's topics up front, with the configured partitions and retention.

Relying on broker auto-creation would leave the partition count and retention to broker
defaults, and a consumer subscribed before the first report would not see the topic until
its next metadata refresh.
"""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from core.kafkasettings import KafkaSettings

log = logging.getLogger(__name__)


async def ensure_topics(kafka: KafkaSettings, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(**kafka.client_kwargs() | {"client_id": "callstream-admin"})
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        configs = {} if kafka.retention_ms is None else {"retention.ms": str(kafka.retention_ms)}
        missing = [
            NewTopic(name, kafka.partitions, kafka.replication_factor, topic_configs=configs)
            for name in names
            if name not in existing
        ]
        if not missing:
            return
        response = await admin.create_topics(missing)
        for topic_error in getattr(response, "topic_errors", []):
            name, code = topic_error[0], topic_error[1]
            if code not in (0, TopicAlreadyExistsError.errno):
                raise KafkaError(f"creating topic {name} failed with error code {code}")
        log.info("created topics %s", ", ".join(t.name for t in missing))
    finally:
        await admin.close()
