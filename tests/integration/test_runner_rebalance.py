"""The runner fetches the next batch while the consumer handles the current one; members
joining and leaving a group under a steady stream must still see each key in order, whole."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Sequence

from consumers.contract import Consumer, Delivery
from core.kafkasettings import KafkaSettings
from ingress.kafkapublisher import KafkaPublisher
from ingress.publisher import OutgoingRecord
from tests.support.produce import encode, sample_report
from tests.support.runner import eventually, running

KEYS = 24
# With a write this slow per batch, a batch fetched ahead is in hand whenever a rebalance
# starts, and a runner that handled it anyway would commit it after losing the partition.
BATCH = 50
WRITE_SECONDS = 0.15
GROUP = "g-rebalance-load"

HandledLog = list[tuple[str, int, str]]  # key, sequence number, which member handled it


class SlowWriter(Consumer):
    """Notes what it handled, in order, taking a database write's time over each batch."""

    name = "slow-writer"

    def __init__(self, member: str, log: HandledLog) -> None:
        self.member = member
        self.log = log
        self.handled = 0

    async def handle(self, batch: Sequence[Delivery]) -> None:
        await asyncio.sleep(WRITE_SECONDS)
        for delivery in batch:
            key, seq = delivery.report.call_id.rsplit("-", 1)
            self.log.append((key, int(seq), self.member))
        self.handled += len(batch)


async def produce_steadily(kafka: KafkaSettings, stop: asyncio.Event, produced: list[int]) -> None:
    """Round after round of one record per key, each key's sequence numbers counting up;
    `produced[0]` is how many rounds the broker acknowledged."""
    publisher = KafkaPublisher(kafka, client_id="test-steady-producer")
    await publisher.start()
    try:
        seq = 0
        while not stop.is_set():
            records = []
            for k in range(KEYS):
                key = f"key{k:02d}"
                _, value = encode(sample_report(call_id=f"{key}-{seq}"))
                records.append(OutgoingRecord(kafka.topic, key.encode(), value, ()))
            await asyncio.gather(*(publisher.publish(r, 30.0) for r in records))
            seq += 1
            produced[0] = seq
            # Slower than two members write, faster than batches come back: a steady backlog.
            await asyncio.sleep(0.1)
    finally:
        await publisher.stop()


async def test_members_joining_and_leaving_under_load_neither_skip_nor_reorder_a_key(
    kafka: KafkaSettings,
) -> None:
    log: HandledLog = []
    first, second = SlowWriter("first", log), SlowWriter("second", log)
    stop_producing = asyncio.Event()
    produced = [0]
    producer = asyncio.create_task(produce_steadily(kafka, stop_producing, produced))
    try:
        async with contextlib.AsyncExitStack() as second_stack:
            async with running(first, kafka, GROUP, batch_size=BATCH):
                await eventually(lambda: first.handled >= 300, timeout=60)
                # A member joins mid-stream: every partition is revoked and shared out again.
                await second_stack.enter_async_context(
                    running(second, kafka, GROUP, batch_size=BATCH)
                )
                await eventually(lambda: second.handled >= 200, timeout=60)
                after_join = first.handled
                await eventually(lambda: first.handled >= after_join + 200, timeout=60)
            # ...and the first leaves mid-stream: the second takes every partition over.
            after_leave = second.handled
            await eventually(lambda: second.handled >= after_leave + 300, timeout=60)
            stop_producing.set()
            await producer
            rounds = produced[0]
            await eventually(lambda: len({(k, s) for k, s, _ in log}) >= rounds * KEYS, timeout=90)
    finally:
        stop_producing.set()
        await asyncio.gather(producer, return_exceptions=True)

    by_key: dict[str, list[int]] = defaultdict(list)
    for key, seq, _ in log:
        by_key[key].append(seq)
    assert sorted(by_key) == [f"key{k:02d}" for k in range(KEYS)]
    for key, seqs in by_key.items():
        # Every record handled (at least once)...
        assert set(seqs) == set(range(rounds)), key
        highest, previous, rewinds = -1, -1, 0
        for seq in seqs:
            # ...none ahead of the next one due...
            assert seq <= highest + 1, f"{key}: {seq} handled when {highest + 1} was due"
            if seq != previous + 1:
                rewinds += 1
            highest, previous = max(highest, seq), seq
        # ...and a key handed again only from where a rebalance restarted it: the join and
        # the leave are two rebalances, so at most two restarts per key.
        assert rewinds <= 2, f"{key} went back {rewinds} times: {seqs}"
    assert first.handled > 0
    assert second.handled > 0
