"""Reading back what landed on a topic, decoded."""

from __future__ import annotations

from dataclasses import dataclass

from callstream.consumerstatus import KafkaInspector
from core.kafkasettings import KafkaSettings
from core.topicreader import RawRecord, read_range, read_topic
from schemas.codec import Decoded, Decoder
from schemas.store import default_store


@dataclass(frozen=True)
class Landed:
    raw: RawRecord
    decoded: Decoded


async def read_back(
    kafka: KafkaSettings, topic: str, *, expect: int | None = None, idle: float = 10.0
) -> list[Landed]:
    """Everything on `topic` (stops at `expect` records, or after `idle` quiet seconds)."""
    decoder = Decoder(default_store())
    out = []
    async for raw in read_topic(kafka, topic, idle_timeout=idle, limit=expect):
        out.append(Landed(raw, await decoder.decode(raw.value)))
    return out


async def read_all(kafka: KafkaSettings, topic: str) -> list[Landed]:
    """Everything on `topic` up to its end right now: exact, with no quiet period to guess.
    Use it once what should be there was acknowledged."""
    async with KafkaInspector(kafka) as look:
        start, end = await look.log_offsets(topic, await look.partitions(topic))
    decoder = Decoder(default_store())
    return [
        Landed(raw, await decoder.decode(raw.value))
        async for raw in read_range(kafka, topic, start, end)
    ]
