"""`ensure_topics` against the real broker: it returns only once the topics can be consumed."""

from __future__ import annotations

import uuid
from dataclasses import replace

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from core.kafkasettings import KafkaSettings
from core.topicadmin import ensure_topics


async def test_a_topic_another_client_is_still_creating_is_led_when_ensure_topics_returns(
    kafka: KafkaSettings,
) -> None:
    """Another process's create request is answered before the new partitions have leaders;
    a consumer subscribing in that moment is assigned none of them, so ensure_topics, which
    every service calls before it subscribes, waits for the leaders."""
    kafka = replace(kafka, partitions=12)
    names = [f"creating.{uuid.uuid4().hex[:8]}.{i}" for i in range(20)]
    admin = AIOKafkaAdminClient(**kafka.client_kwargs())
    await admin.start()
    try:
        # Not awaited to completion on the broker side: the controller has them, the
        # brokers' metadata may not yet.
        await admin.create_topics([NewTopic(name, 12, 1) for name in names], timeout_ms=0)
        await ensure_topics(kafka, names)
        described = await admin.describe_topics(names)
    finally:
        await admin.close()
    assert sorted(t["topic"] for t in described) == sorted(names)
    for topic in described:
        assert topic["error_code"] == 0, topic
        assert len(topic["partitions"]) == 12, topic["topic"]
        assert all(p["leader"] >= 0 for p in topic["partitions"]), topic
