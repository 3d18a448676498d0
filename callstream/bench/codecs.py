"""What each compression codec costs the ingress: the CPU to build one produce batch of
encoded reports (aiokafka compresses on the event loop, in the producer's sender) and the
bytes that batch puts on the wire, per record, for the sample report and a long call.

    python -m callstream.bench.codecs [--repeat N]

CPU time is the process's own (time.process_time), the best of N builds, so other work on
the machine inflates it less than it inflates wall-clock figures.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from callstream.bench import pool
from schemas.codec import single_object_encoder
from schemas.normalise import normalise
from schemas.store import END_OF_CALL_REPORT, default_store

# aiokafka's codec attribute values (the Kafka protocol's); lz4 is level 9 (HC) in aiokafka,
# zstd level 3, gzip level 9, and none of them can be changed through the producer.
CODECS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
BATCH_BYTES = (256 * 1024, 1024 * 1024)


@dataclass(frozen=True, slots=True)
class CodecCost:
    body: str
    avro_bytes: int
    batch_bytes: int
    records: int
    codec: str
    cpu_us_per_record: float
    wire_bytes_per_record: float


def encoded(body: bytes) -> bytes:
    """The Avro record the ingress would publish for this request body."""
    event = normalise(orjson.loads(body), received_at_ms=int(time.time() * 1000), request_id="x")
    assert event.record is not None
    return single_object_encoder(default_store().current(END_OF_CALL_REPORT)).encode(event.record)


def build_batch(value: bytes, records: int, codec: int, batch_bytes: int) -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=codec,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=batch_bytes,
    )
    for _ in range(records):
        key = str(uuid.uuid4()).encode()
        if builder.append(0, timestamp=None, key=key, value=value, headers=[]) is None:
            raise ValueError(f"{records} records of {len(value)} bytes overflow the batch")
    return bytes(builder.build())


def measure(repeat: int = 20) -> Iterator[CodecCost]:
    for template in (pool.templates()[0], pool.long_call()):
        value = encoded(template.fresh()[1])
        for batch_bytes in BATCH_BYTES:
            # As many as the producer puts in one batch (each record has some framing).
            records = max(1, batch_bytes // (len(value) + 100))
            for codec, attribute in CODECS.items():
                best, wire = float("inf"), 0
                for _ in range(repeat):
                    started = time.process_time()
                    wire = len(build_batch(value, records, attribute, batch_bytes))
                    best = min(best, time.process_time() - started)
                yield CodecCost(
                    template.name,
                    len(value),
                    batch_bytes,
                    records,
                    codec,
                    round(best / records * 1e6, 1),
                    round(wire / records),
                )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m callstream.bench.codecs")
    parser.add_argument("--repeat", type=int, default=20, help="builds per figure (best kept)")
    args = parser.parse_args()
    print(
        f"{'body':<22}{'Avro B':>8}{'batch':>9}{'records':>9}  {'codec':<7}{'CPU µs/rec':>11}"
        f"{'wire B/rec':>11}"
    )
    for row in measure(args.repeat):
        print(
            f"{row.body:<22}{row.avro_bytes:>8,}{row.batch_bytes // 1024:>6} kB{row.records:>9}"
            f"  {row.codec:<7}{row.cpu_us_per_record:>11,.1f}{row.wire_bytes_per_record:>11,.0f}"
        )


if __name__ == "__main__":
    main()
