"""Reading back what landed on a topic, decoded."""

from __future__ import annotations

from dataclasses import dataclass

from callstream.kafkaconfig import KafkaSettings
from callstream.topicreader import RawRecord, read_topic
from schemas.codec import Decoded, Decoder
from schemas.store import default_store


@dataclass(frozen=True)
class Landed:
    raw: RawRecord
    decoded: Decoded


async def read_back(
    kafka: KafkaSettings, topic: str, *, expect: int | None = None, idle: float = 3.0
) -> list[Landed]:
    """Everything on `topic` (stops at `expect` records, or after `idle` quiet seconds)."""
    decoder = Decoder(default_store())
    out = []
    async for raw in read_topic(kafka, topic, idle_timeout=idle, limit=expect):
        out.append(Landed(raw, await decoder.decode(raw.value)))
    return out
