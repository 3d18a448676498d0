"""The storage consumer's CPU per record without Kafka: where `callstream bench`'s catch-up
figures come from, stage by stage, on a machine too busy for its rates to mean much.

* stages: main-thread CPU (`time.thread_time`, best of 15) of decoding 500 sample reports
  and checking them as the runner does, and of each dialect's rows for them;
* handle: the storage consumer (SQLite in a temp dir) handling 500-record batches of fresh
  reports (catch-up), then the same again (replay): records/s, and CPU per record for the
  main thread and for the whole process (the SQLite thread included).

Run as ``python -m callstream.bench.storagepath [--records N] [--rounds R]``
(docs/performance.md, "Storage consumer").
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import timeit
import uuid
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry

from callstream.bench import pool
from consumers.contract import DecodedDelivery
from consumers.storage.consumer import build
from consumers.storage.dialects import POSTGRES, SQLITE
from schemas.codec import Decoder, single_object_encoder
from schemas.normalise import normalise
from schemas.report import CallReport
from schemas.store import END_OF_CALL_REPORT, default_store

_BATCH = 500


def sample_records(count: int) -> list[bytes]:
    """`count` sample reports as the ingress puts them on the topic, each its own call."""
    sample = pool.sample_report()
    encoder = single_object_encoder(default_store().current(END_OF_CALL_REPORT))
    values = []
    for i in range(count):
        payload = sample | {"callId": str(uuid.uuid4())}
        normalised = normalise(payload, received_at_ms=1_700_000_000_000 + i, request_id=str(i))
        assert normalised.record is not None
        values.append(encoder.encode(normalised.record))
    return values


def deliveries(decoder: Decoder, values: Sequence[bytes], first: int) -> list[DecodedDelivery]:
    """What the runner hands the consumer for `values`."""
    out = []
    for offset, value in enumerate(values, first):
        record = decoder.decode_local(value).record
        CallReport.check_record(record)
        out.append(DecodedDelivery(None, "bench", 0, offset, value, record=record))
    return out


def _per_record(work: Callable[[], object], count: int) -> float:
    return min(timeit.repeat(work, number=1, repeat=15, timer=time.thread_time)) / count * 1e6


def stages(values: Sequence[bytes]) -> dict[str, float]:
    decoder = Decoder(default_store())
    batch = deliveries(decoder, values, 0)
    return {
        "decode": _per_record(lambda: [decoder.decode_local(v) for v in values], len(values)),
        "decode + check": _per_record(lambda: deliveries(decoder, values, 0), len(values)),
        "sqlite rows": _per_record(lambda: SQLITE.rows(batch), len(values)),
        "postgresql rows": _per_record(lambda: POSTGRES.rows(batch), len(values)),
    }


async def handle(values: Sequence[bytes]) -> dict[str, tuple[float, float, float]]:
    """(records/s, main-thread µs, process µs) per record, for a catch-up and a replay."""
    decoder = Decoder(default_store())
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        consumer = build({"CALLSTREAM_SQLITE_PATH": f"{tmp}/bench.db"}, CollectorRegistry())
        await consumer.start()
        try:
            for run in ("catch-up", "replay"):
                wall, process, thread = time.perf_counter(), time.process_time(), time.thread_time()
                for start in range(0, len(values), _BATCH):
                    chunk = values[start : start + _BATCH]
                    await consumer.handle(deliveries(decoder, chunk, start))
                n = len(values)
                results[run] = (
                    n / (time.perf_counter() - wall),
                    (time.thread_time() - thread) / n * 1e6,
                    (time.process_time() - process) / n * 1e6,
                )
        finally:
            await consumer.stop()
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m callstream.bench.storagepath")
    parser.add_argument("--records", type=int, default=20_000, help="for handle (%(default)s)")
    parser.add_argument("--rounds", type=int, default=1, help="of both (%(default)s)")
    args = parser.parse_args(argv)
    values = sample_records(args.records)
    for _ in range(args.rounds):
        figures = stages(values[:_BATCH])
        print("stages, µs per record:", ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))
        for run, (rate, main_us, process_us) in asyncio.run(handle(values)).items():
            print(
                f"handle {run}: {rate:,.0f}/s, main thread {main_us:.1f} µs,"
                f" process {process_us:.1f} µs per record"
            )


if __name__ == "__main__":
    main()
