"""The bench's large-reports phase: the long call it sends, how it names the bound, and its
figures in the results file and the printed table."""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest
from aiokafka.record.default_records import DefaultRecordBatch

from callstream.bench import codecs, pool
from callstream.bench.large import bound_of, mean_body_bytes
from callstream.bench.report import (
    LargeRun,
    Latency,
    ProcessUsage,
    Results,
    render_table,
    write_json,
)
from callstream.bench.resultsfile import read_results
from schemas.normalise import normalise


def test_the_long_call_is_59_kb_of_transcript_and_the_same_turns_as_messages() -> None:
    long = pool.long_call()
    payload = orjson.loads(long.body)
    turns = payload["transcriptText"].split("\n")

    assert 59_000 <= long.size < 59_200
    assert len(payload["messages"]) == len(turns)
    for line, message in zip(turns, payload["messages"], strict=True):
        speaker, said = line.split(": ", 1)
        assert message == {"role": "assistant" if speaker == "AI" else "user", "content": said}
    # Each request of a pool gets its own call id in the same number of bytes.
    call_id, body = long.fresh()
    assert len(body) == long.size
    assert orjson.loads(body)["callId"] == call_id


def test_the_ingress_takes_the_long_call_and_keeps_its_messages() -> None:
    payload = orjson.loads(pool.long_call().fresh()[1])

    event = normalise(payload, received_at_ms=1, request_id="test")

    assert event.record is not None
    assert orjson.loads(event.record["extra_json"])["messages"] == payload["messages"]


def test_mean_body_bytes_counts_bodies_not_headers() -> None:
    short, long = pool.templates()
    requests = pool.mixed_requests(short, long, 40, long_every=20, secret="s", host="h:1")

    assert mean_body_bytes(requests) == (38 * short.size + 2 * long.size) / 40


FIGURES = {
    "accepted": 10_000,
    "spooled": 0,
    "ack_missed": 0,
    "ingress_core": 0.5,
    "broker_core": 0.2,
    "machine_cores": 1.0,
    "cpus": 2,
    "ack_p50_ms": 5.0,
    "answer_p50_ms": 80.0,
}


@pytest.mark.parametrize(
    ("changed", "starts"),
    [
        ({"spooled": 7_000, "ack_missed": 20, "ingress_core": 0.95}, "the spool: 70% "),
        ({"ingress_core": 0.93, "machine_cores": 1.95}, "ingress CPU: its event loop used 93%"),
        ({"broker_core": 0.9}, "broker CPU: 90% of a core"),
        ({"machine_cores": 1.9}, "the machine's CPUs: 1.9 of 2 cores busy"),
        ({"ack_p50_ms": 50.0}, "Kafka's acknowledgement: p50 <= 50 ms of a 80 ms answer"),
        ({}, "not one clear bound"),
        # A few spooled reports (late ones, and later reports of their calls) are not where
        # the bound is.
        ({"spooled": 500, "ack_missed": 50}, "not one clear bound"),
    ],
)
def test_the_bound_is_the_first_figure_that_saturates(
    changed: dict[str, float], starts: str
) -> None:
    figures = FIGURES | changed

    bound = bound_of(**figures)  # type: ignore[arg-type]

    assert bound.startswith(starts), bound


def large_run() -> LargeRun:
    return LargeRun(
        label="100% long",
        env={"CALLSTREAM_X": "1"},
        generator="wrk -t1 -c128 -d15s",
        mix="1 in 1 reports a long call 59.0 kB, the rest sample 2.3 kB",
        duration_s=15.0,
        requests=5_841,
        non_2xx=0,
        socket_errors=0,
        reports_per_s=380.0,
        mb_per_s=22.4,
        latency=Latency(count=5_841, p50_ms=267.7, p90_ms=900.0, p99_ms=1937.7, max_ms=2500.0),
        accepted=5_841,
        spooled=4_102,
        ack_missed=20,
        spool_left=0,
        drain_seconds=6.0,
        kafka_ack={"p50_at_most_ms": 250.0, "p90_at_most_ms": 1500.0, "p99_at_most_ms": 2500.0},
        spool_fsync={"p50_at_most_ms": 5.0, "p90_at_most_ms": 25.0, "p99_at_most_ms": math.nan},
        publish={"p50_at_most_ms": 250.0, "p90_at_most_ms": 500.0, "p99_at_most_ms": 2500.0},
        fsyncs=109,
        ingress_core=0.64,
        broker_core=0.07,
        processes=[ProcessUsage("ingress", 9.6, 1.731, 205.0)],
        series=[(1.0, 380.0)],
        bound="the spool: 70% of accepted reports went to disk instead of Kafka",
    )


def test_a_large_run_reads_back_from_the_results_file(tmp_path: Path) -> None:
    results = Results(meta={"started_at": "2026-12-07T16:00:00+00:00"}, large=[large_run()])
    write_json(results, tmp_path / "run.json")

    back = read_results(tmp_path / "run.json")

    assert back.large[0].kafka_ack == large_run().kafka_ack
    assert math.isnan(back.large[0].spool_fsync["p99_at_most_ms"])
    assert back.large[0].bound == large_run().bound


def test_an_older_results_file_without_large_runs_still_reads(tmp_path: Path) -> None:
    data = orjson.loads(orjson.dumps(Results(meta={})))
    del data["large"]
    (tmp_path / "old.json").write_bytes(orjson.dumps(data))

    assert read_results(tmp_path / "old.json").large == []


def test_the_table_says_what_went_to_the_spool_and_where_the_bound_is() -> None:
    table = render_table(Results(meta={}, large=[large_run()]))

    assert "Large reports, wrk -t1 -c128 -d15s" in table
    assert "380 reports/s, 22.4 MB/s accepted" in table
    assert "spooled 4,102 of 5,841 accepted (20 waited out the ack deadline" in table
    assert "Kafka ack p50 <= 250.0  p90 <= 1,500.0  p99 <= 2,500.0 ms" in table
    assert "bound: the spool: 70%" in table


def test_every_codec_builds_a_batch_kafka_can_read_back_as_the_same_records() -> None:
    value = codecs.encoded(pool.long_call().fresh()[1])

    for name, attribute in codecs.CODECS.items():
        batch = DefaultRecordBatch(codecs.build_batch(value, 3, attribute, 1024 * 1024))
        assert [r.value for r in batch] == [value] * 3, name
        assert batch.compression_type == attribute


def test_the_codec_table_has_every_codec_for_both_bodies_and_batch_sizes() -> None:
    rows = list(codecs.measure(repeat=1))

    assert len(rows) == 2 * len(codecs.BATCH_BYTES) * len(codecs.CODECS)
    long_rows = {r.codec: r for r in rows if r.body.startswith("long call")}
    # A long call's turns compress: any codec puts less on the wire than none.
    assert all(
        r.wire_bytes_per_record < long_rows["none"].wire_bytes_per_record
        for c, r in long_rows.items()
        if c != "none"
    )
