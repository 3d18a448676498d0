"""Moving a consumer group's committed offsets from outside the group."""

from __future__ import annotations

from collections.abc import Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition

from core.kafkasettings import KafkaSettings


async def commit_group_offsets(
    kafka: KafkaSettings, group_id: str, topic: str, offsets: Mapping[int, int]
) -> None:
    """Commit `offsets` for `group_id` without joining it (assign, never subscribe).

    The broker accepts such a commit only while the group has no members, so this can
    never pull offsets from under a running consumer; CommitFailedError says it has some.
    """
    if not offsets:
        return
    committer = AIOKafkaConsumer(
        **kafka.client_kwargs() | {"client_id": "callstream-replay"},
        group_id=group_id,
        enable_auto_commit=False,
    )
    try:
        await committer.start()
        positions = {TopicPartition(topic, p): o for p, o in offsets.items()}
        committer.assign(list(positions))
        await committer.commit(positions)
    finally:
        await committer.stop()
