"""The shared runner against the real broker: commit after the handler, retries, DLQ."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import CollectorRegistry

from consumers.contract import Consumer, Delivery
from consumers.errors import PermanentError, RetryableError
from consumers.runner import Runner
from core.kafkasettings import KafkaSettings
from tests.support.produce import produce_raw, produce_reports, sample_report
from tests.support.runner import eventually
from tests.support.runner import running as run_in_group
from tests.support.topics import read_back


class Recorder(Consumer):
    """Records what it was handed; behaviour per test through the hooks below."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.batches: list[list[str]] = []
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.retryable_failures = 0
        self.poison_ids: set[str] = set()

    async def handle(self, batch: Sequence[Delivery]) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.retryable_failures > 0:
            self.retryable_failures -= 1
            raise RetryableError("database is down")
        for delivery in batch:
            if delivery.report.call_id in self.poison_ids:
                raise PermanentError(f"refused {delivery.report.call_id}")
        self.seen += [d.report.call_id for d in batch]
        self.batches.append([d.report.call_id for d in batch])


def running(
    consumer: Consumer, kafka: KafkaSettings, group: str, registry: CollectorRegistry | None = None
) -> contextlib.AbstractAsyncContextManager[Runner]:
    # Short backoff: the retry tests would otherwise wait out production delays.
    return run_in_group(
        consumer, kafka, group, registry, retry_initial_seconds=0.05, retry_max_seconds=0.2
    )


async def committed(kafka: KafkaSettings, group: str) -> int:
    """Sum of the group's committed offsets over the topic's partitions."""
    admin = AIOKafkaAdminClient(**kafka.client_kwargs())
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == kafka.topic)


async def test_runner_commits_only_after_handler_returns(kafka: KafkaSettings) -> None:
    ids = await produce_reports(kafka, [sample_report() for _ in range(5)])
    consumer = Recorder()
    consumer.gate = asyncio.Event()
    async with running(consumer, kafka, "g-commit") as runner:
        await eventually(lambda: consumer.calls >= 1)
        await asyncio.sleep(1.0)
        assert await committed(kafka, "g-commit") == 0
        consumer.gate.set()
        await eventually(lambda: len(consumer.seen) == 5)
        await eventually(lambda: runner.last_batch_at is not None)
    assert sorted(consumer.seen) == sorted(ids)
    assert await committed(kafka, "g-commit") == 5


async def test_what_arrives_while_a_batch_is_in_hand_is_all_in_the_next_batch(
    kafka: KafkaSettings,
) -> None:
    """Records that reach Kafka one by one while the handler works on a batch are handed
    over together next, not the first of them alone while the rest wait a batch more."""
    consumer = Recorder()
    consumer.gate = asyncio.Event()
    async with running(consumer, kafka, "g-gather"):
        first = await produce_reports(kafka, [sample_report()])
        await eventually(lambda: consumer.calls >= 1)
        later: list[str] = []
        for _ in range(3):
            later += await produce_reports(kafka, [sample_report()])
            await asyncio.sleep(0.3)  # long enough for each to come in a fetch of its own
        consumer.gate.set()
        await eventually(lambda: len(consumer.seen) == 4)
    assert consumer.batches[0] == first
    assert [sorted(b) for b in consumer.batches[1:]] == [sorted(later)]


async def test_retryable_error_backs_off_then_succeeds_without_losing_records(
    kafka: KafkaSettings,
) -> None:
    ids = await produce_reports(kafka, [sample_report() for _ in range(3)])
    consumer = Recorder()
    consumer.retryable_failures = 4
    registry = CollectorRegistry()
    async with running(consumer, kafka, "g-retry", registry):
        await eventually(lambda: len(consumer.seen) == 3)
    assert sorted(consumer.seen) == sorted(ids)
    assert registry.get_sample_value(
        "callstream_consumer_records_failed_total", {"consumer": "recorder"}
    ) == pytest.approx(4)
    assert await committed(kafka, "g-retry") == 3


async def test_retrying_does_not_spin(kafka: KafkaSettings) -> None:
    await produce_reports(kafka, [sample_report()])
    consumer = Recorder()
    consumer.retryable_failures = 10_000
    async with running(consumer, kafka, "g-spin"):
        await eventually(lambda: consumer.calls >= 1)
        await asyncio.sleep(2.0)
    # Backoff from 50 ms capped at 200 ms: a couple of dozen attempts in 2 s, not thousands.
    assert consumer.calls < 60
    assert await committed(kafka, "g-spin") == 0


async def test_poison_records_go_to_the_dlq_and_consumption_goes_on(kafka: KafkaSettings) -> None:
    good = await produce_reports(kafka, [sample_report()])
    await produce_raw(kafka, [(b"junk-key", b"this is not avro")])
    refused = sample_report()
    consumer = Recorder()
    consumer.poison_ids = {refused["callId"]}
    more = await produce_reports(kafka, [refused, sample_report()])
    registry = CollectorRegistry()
    async with running(consumer, kafka, "g-dlq", registry):
        await eventually(lambda: len(consumer.seen) == 2)
        dead = await read_back_raw(kafka, kafka.dlq_topic, expect=2)
    assert sorted(consumer.seen) == sorted([good[0], more[1]])
    by_type = {d.header("dlq.error.type"): d for d in dead}
    assert set(by_type) == {"DecodeError", "PermanentError"}
    undecodable = by_type["DecodeError"]
    assert undecodable.value == b"this is not avro"
    assert undecodable.key == b"junk-key"
    assert undecodable.header("dlq.topic") == kafka.topic
    assert undecodable.header("dlq.consumer") == "recorder"
    assert undecodable.header("dlq.offset") is not None
    assert undecodable.header("dlq.partition") is not None
    refused_dead = by_type["PermanentError"]
    assert refused["callId"] in (refused_dead.header("dlq.error") or "")
    assert registry.get_sample_value(
        "callstream_consumer_records_dead_lettered_total", {"consumer": "recorder"}
    ) == pytest.approx(2)
    assert await committed(kafka, "g-dlq") == 4


async def read_back_raw(kafka: KafkaSettings, topic: str, expect: int) -> list:  # type: ignore[type-arg]
    from core.topicreader import read_topic

    return [r async for r in read_topic(kafka, topic, idle_timeout=10.0, limit=expect)]


async def test_two_runners_in_one_group_share_the_work_once(kafka: KafkaSettings) -> None:
    ids = await produce_reports(kafka, [sample_report() for _ in range(60)])
    first, second = Recorder(), Recorder()
    async with running(first, kafka, "g-share"), running(second, kafka, "g-share"):
        await eventually(lambda: len(set(first.seen + second.seen)) == 60, timeout=60)
        await asyncio.sleep(1.0)
    handled = first.seen + second.seen
    # Each record once (a rebalance may hand a batch again only if it was not committed).
    assert sorted(set(handled)) == sorted(ids)
    assert await committed(kafka, "g-share") == 60


async def test_lag_and_commit_metrics(kafka: KafkaSettings) -> None:
    await produce_reports(kafka, [sample_report() for _ in range(4)])
    registry = CollectorRegistry()
    consumer = Recorder()

    def lags() -> list[float]:
        # Call ids are random, so which of the topic's partitions got the four records is too:
        # look at all of them. A partition with no commit yet has no lag series.
        found = (
            registry.get_sample_value(
                "callstream_consumer_lag", {"consumer": "recorder", "partition": str(p)}
            )
            for p in range(kafka.partitions)
        )
        return [lag for lag in found if lag is not None]

    async with running(consumer, kafka, "g-lag", registry):
        await eventually(lambda: len(consumer.seen) == 4)
        # Every record handled and committed: each partition's lag series settles at zero.
        await eventually(lambda: bool(lags()) and not any(lags()))
    assert (
        registry.get_sample_value(
            "callstream_consumer_last_commit_timestamp_seconds", {"consumer": "recorder"}
        )
        or 0
    ) > 0
    assert registry.get_sample_value(
        "callstream_consumer_records_handled_total", {"consumer": "recorder"}
    ) == pytest.approx(4)


async def test_the_lag_is_current_as_soon_as_a_commit_lands(kafka: KafkaSettings) -> None:
    """Commits travel in the background: the lag must follow the commit, not the handler."""
    await produce_reports(kafka, [sample_report() for _ in range(4)])
    registry = CollectorRegistry()
    async with running(Recorder(), kafka, "g-lag-now", registry) as runner:
        # Looked at on every loop turn, so before the idle loop's own refresh half a second on.
        while runner.last_batch_at is None:  # noqa: ASYNC110 - the runner has no event for it
            await asyncio.sleep(0)
        found = [
            registry.get_sample_value(
                "callstream_consumer_lag", {"consumer": "recorder", "partition": str(p)}
            )
            for p in range(kafka.partitions)
        ]
    lags = [lag for lag in found if lag is not None]
    assert lags, "no lag series once the first commit landed"
    assert not any(lags)


async def test_topic_read_back_helper_sees_what_was_produced(kafka: KafkaSettings) -> None:
    ids = await produce_reports(kafka, [sample_report()])
    [landed] = await read_back(kafka, kafka.topic, expect=1)
    assert landed.raw.key == ids[0].encode()


async def test_rebalance_waits_for_the_batch_in_hand_and_commits_it(kafka: KafkaSettings) -> None:
    """A second member joins while the first is inside its handler: the first finishes and
    commits, so nothing it handled is handled again by the newcomer."""
    ids = await produce_reports(kafka, [sample_report() for _ in range(30)])
    first, second = Recorder(), Recorder()
    first.gate = asyncio.Event()
    async with running(first, kafka, "g-rebalance-commit"):
        await eventually(lambda: first.calls >= 1)
        async with running(second, kafka, "g-rebalance-commit"):
            await asyncio.sleep(1.0)  # the join is now waiting on the first member's batch
            first.gate.set()
            await eventually(lambda: len(set(first.seen + second.seen)) == 30, timeout=60)
            await asyncio.sleep(1.0)
    assert sorted(set(first.seen + second.seen)) == sorted(ids)
    assert len(first.seen) + len(second.seen) == 30  # nothing handled twice
    assert await committed(kafka, "g-rebalance-commit") == 30


async def test_rebalance_drops_a_batch_still_retrying_and_the_new_owner_handles_it(
    kafka: KafkaSettings,
) -> None:
    # Enough records that the newcomer's partitions surely hold some (12 could, rarely,
    # all hash to the partitions the first member keeps).
    ids = await produce_reports(kafka, [sample_report() for _ in range(60)])
    first, second = Recorder(), Recorder()
    first.retryable_failures = 1_000_000  # the first member's database never comes back
    async with running(first, kafka, "g-rebalance-drop"):
        await eventually(lambda: first.calls >= 2)
        async with running(second, kafka, "g-rebalance-drop"):
            # Whatever partitions move to the newcomer get handled there; the first member
            # dropped its batch uncommitted instead of blocking the group.
            await eventually(lambda: len(second.seen) > 0, timeout=60)
    assert first.seen == []
    assert set(second.seen) <= set(ids)
