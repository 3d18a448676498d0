"""`callstream dlq list` and `callstream dlq redrive` against the real broker, with two
consumers running in their own groups while their dead letters are listed and re-driven."""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from callstream.consumerstatus import KafkaInspector, TopicMissingError
from callstream.dlq import DeadLetter, Snapshot, list_command
from consumers.contract import Consumer, Delivery
from consumers.errors import PermanentError
from core.kafkasettings import KafkaSettings
from core.producer import durable_producer
from core.topicadmin import ensure_topics
from core.topicreader import RawRecord
from tests.support.cli import callstream
from tests.support.produce import produce_reports, sample_report
from tests.support.runner import Recorder, eventually, running


class Fussy(Consumer):
    """Refuses some calls for good, until the test "fixes" it."""

    name = "fussy"

    def __init__(self, refuse: set[str]) -> None:
        self.refuse = refuse
        self.seen: list[str] = []

    async def handle(self, batch: Sequence[Delivery]) -> None:
        for delivery in batch:
            if delivery.report.call_id in self.refuse:
                raise PermanentError(f"cannot take {delivery.report.call_id}")
        self.seen += [d.report.call_id for d in batch]


async def dead_letters(kafka: KafkaSettings) -> list[dict[str, Any]]:
    """`callstream dlq list --json`, in this process: cheap enough to poll."""
    out = io.StringIO()
    assert await list_command(kafka, out, as_json=True) == 0
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


async def topic_end(kafka: KafkaSettings, topic: str) -> int:
    async with KafkaInspector(kafka) as look:
        _, end = await look.log_offsets(topic, await look.partitions(topic))
    return sum(end.values())


async def caught_up(kafka: KafkaSettings, group: str) -> bool:
    async with KafkaInspector(kafka) as look:
        return sum(p.lag for p in await look.lags(group, kafka.topic)) == 0


async def test_redrive_sends_dead_letters_back_to_their_consumer_only(
    kafka: KafkaSettings,
) -> None:
    ok_first, lost_once, lost_twice, ok_last = await produce_reports(
        kafka, [sample_report() for _ in range(4)]
    )
    fussy = Fussy({lost_once, lost_twice})
    other = Recorder()
    other_metrics = CollectorRegistry()
    fussy_group, other_group = f"g-fussy-{uuid.uuid4().hex[:8]}", f"g-other-{uuid.uuid4().hex[:8]}"
    async with (
        running(fussy, kafka, fussy_group),
        running(other, kafka, other_group, other_metrics),
    ):
        await eventually(lambda: sorted(fussy.seen) == sorted([ok_first, ok_last]))

        async def dead_lettered(count: int) -> bool:
            return len(await dead_letters(kafka)) == count

        await eventually(lambda: dead_lettered(2), timeout=90)
        code, out, err = await callstream(kafka, "dlq", "list", "--json")
        assert code == 0, err
        listed = [orjson.loads(line) for line in out.splitlines()]
        assert {d["key"] for d in listed} == {lost_once, lost_twice}
        for letter in listed:
            assert letter["consumer"] == "fussy"
            assert letter["error_type"] == "PermanentError"
            assert letter["key"] in letter["error"]
            assert letter["origin"]["topic"] == kafka.topic
            assert isinstance(letter["origin"]["offset"], int)
            assert letter["redriven"] is False

        code, table, _ = await callstream(kafka, "dlq", "list")
        assert code == 0
        assert f"2 dead letter(s) on {kafka.dlq_topic}" in table
        [row] = [line.split() for line in table.splitlines() if line.startswith("fussy")]
        assert row[:4] == ["fussy", "PermanentError", "2", "2"]

        before = await topic_end(kafka, kafka.topic)
        code, out, _ = await callstream(kafka, "dlq", "redrive", "--consumer", "fussy", "--dry-run")
        assert code == 0
        assert "2 dead letter(s) of fussy not yet re-driven" in out
        assert await topic_end(kafka, kafka.topic) == before

        # The cause of one of them is fixed; the other still fails.
        fussy.refuse = {lost_twice}
        code, out, err = await callstream(kafka, "dlq", "redrive", "--consumer", "fussy")
        assert code == 0, err
        assert f"re-drove 2 onto {kafka.topic}" in out
        assert await topic_end(kafka, kafka.topic) == before + 2

        await eventually(lambda: lost_once in fussy.seen)
        await eventually(lambda: dead_lettered(3), timeout=90)
        await eventually(lambda: caught_up(kafka, other_group), timeout=90)

    # The other consumer handled each call once, and passed over the re-driven copies.
    assert sorted(other.seen) == sorted([ok_first, lost_once, lost_twice, ok_last])
    assert (
        other_metrics.get_sample_value(
            "callstream_consumer_records_skipped_total", {"consumer": "recorder"}
        )
        == 2
    )
    assert fussy.seen.count(lost_once) == 1

    listed = await dead_letters(kafka)
    assert [d["redriven"] for d in listed if d["key"] == lost_once] == [True]
    again = sorted((d for d in listed if d["key"] == lost_twice), key=lambda d: d["offset"])
    assert [d["redriven"] for d in again] == [True, False]

    # Only what failed again is left; once fixed, a second re-drive clears it.
    fussy.refuse = set()
    code, out, _ = await callstream(kafka, "dlq", "redrive", "--consumer", "fussy")
    assert code == 0
    assert "1 dead letter(s) of fussy not yet re-driven" in out
    async with running(fussy, kafka, fussy_group):
        await eventually(lambda: lost_twice in fussy.seen)
    assert fussy.seen.count(lost_twice) == 1
    code, out, _ = await callstream(kafka, "dlq", "redrive", "--consumer", "fussy")
    assert code == 0
    assert "0 dead letter(s) of fussy not yet re-driven" in out


async def test_a_failed_record_keeps_its_redrive_header_and_gets_the_new_reason(
    kafka: KafkaSettings,
) -> None:
    [refused] = await produce_reports(kafka, [sample_report()])
    fussy = Fussy({refused})
    async with running(fussy, kafka, f"g-{uuid.uuid4().hex[:8]}"):

        async def dead_lettered(count: int) -> bool:
            return len(await dead_letters(kafka)) == count

        await eventually(lambda: dead_lettered(1), timeout=90)
        code, _, err = await callstream(kafka, "dlq", "redrive", "--consumer", "fussy")
        assert code == 0, err
        await eventually(lambda: dead_lettered(2), timeout=90)
    first, second = sorted(await dead_letters(kafka), key=lambda d: d["offset"])
    assert first["redrive_for"] is None
    assert second["redrive_for"] == "fussy"
    # The second failure points at the re-driven copy: same key, so the same partition,
    # further on.
    assert second["origin"]["topic"] == kafka.topic
    assert second["origin"]["partition"] == first["origin"]["partition"]
    assert second["origin"]["offset"] > first["origin"]["offset"]
    assert second["consumer"] == "fussy"
    assert refused in second["error"]


async def test_nothing_to_list_or_redrive_before_any_dead_letter(kafka: KafkaSettings) -> None:
    code, out, _ = await callstream(kafka, "dlq", "list")
    assert code == 0
    assert f"no dead letters: {kafka.dlq_topic} does not exist yet" in out
    code, out, _ = await callstream(kafka, "dlq", "redrive", "--consumer", "storage")
    assert code == 0
    assert "nothing to re-drive" in out


def test_redrive_headers_drop_the_dead_letter_reason_and_name_the_consumer() -> None:
    record = RawRecord(
        topic="t.dlq",
        partition=0,
        offset=7,
        timestamp_ms=0,
        key=b"call-1",
        value=b"avro",
        headers=(
            ("event-type", b"end-of-call-report"),
            ("redrive-for", b"storage"),
            ("dlq.error", b"boom"),
            ("dlq.error.type", b"PermanentError"),
            ("dlq.topic", b"t"),
            ("dlq.partition", b"3"),
            ("dlq.offset", b"41"),
            ("dlq.consumer", b"storage"),
            ("request-id", b"r-1"),
        ),
    )
    letter = DeadLetter.of(record, default_topic="fallback")
    assert (letter.consumer, letter.error_type, letter.error, letter.origin_topic) == (
        "storage",
        "PermanentError",
        "boom",
        "t",
    )
    assert letter.redrive_headers() == [
        ("event-type", b"end-of-call-report"),
        ("request-id", b"r-1"),
        ("redrive-for", b"storage"),
    ]
    assert letter.to_json(redriven=False)["origin"] == {"topic": "t", "partition": 3, "offset": 41}


def test_a_dead_letter_without_callstream_headers_is_still_listed() -> None:
    bare = RawRecord("t.dlq", 1, 2, 0, None, b"x", ())
    letter = DeadLetter.of(bare, default_topic="t")
    assert (letter.consumer, letter.error_type, letter.origin_topic) == ("unknown", "unknown", "t")
    assert letter.to_json(redriven=True)["origin"] == {
        "topic": "t",
        "partition": None,
        "offset": None,
    }


async def test_redrive_stops_before_sending_when_a_dead_letters_topic_is_gone(
    kafka: KafkaSettings,
) -> None:
    gone = f"{kafka.topic}.renamed-away"
    producer = durable_producer(kafka, "test-dlq-writer")
    await producer.start()
    try:
        await ensure_topics(kafka, [kafka.dlq_topic])
        await producer.send_and_wait(
            kafka.dlq_topic,
            b"avro",
            key=b"call-1",
            headers=[("dlq.consumer", b"fussy"), ("dlq.topic", gone.encode())],
        )
    finally:
        await producer.stop()

    code, out, err = await callstream(kafka, "dlq", "redrive", "--consumer", "fussy")

    assert code == 1
    assert "1 dead letter(s) of fussy not yet re-driven" in out
    assert f"nothing re-driven: {gone} no longer exist(s)" in err
    async with KafkaInspector(kafka) as look:
        with pytest.raises(TopicMissingError):
            await look.partitions(gone)  # not auto-created by a send
    [letter] = await dead_letters(kafka)
    assert letter["redriven"] is False


def test_a_header_without_a_value_reads_as_missing() -> None:
    record = RawRecord("t.dlq", 0, 0, 0, None, b"x", (("dlq.consumer", None),))  # type: ignore[arg-type]
    assert DeadLetter.of(record, default_topic="t").consumer == "unknown"


def test_a_redrive_position_past_the_end_counts_as_none() -> None:
    # The dead-letter topic was deleted and created again: its offsets start over.
    snapshot = Snapshot(beginning={0: 0, 1: 3}, end={0: 5, 1: 8})
    assert snapshot.after({0: 9, 1: 4}) == {0: 0, 1: 4}
    assert snapshot.after({}) == {0: 0, 1: 3}
    assert snapshot.after({1: 1}) == {0: 0, 1: 3}  # retention passed it
