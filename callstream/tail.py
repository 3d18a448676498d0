"""`callstream tail`: decoded records from a topic as JSON lines."""

from __future__ import annotations

from typing import Any, TextIO

import aiohttp
import orjson

from core.kafkasettings import KafkaSettings
from core.topicreader import read_topic
from schemas.codec import Decoder
from schemas.errors import DecodeError
from schemas.registry import registry_client
from schemas.report import CallReport
from schemas.store import END_OF_CALL_REPORT, default_store


async def tail(
    kafka: KafkaSettings,
    topic: str,
    *,
    follow: bool,
    limit: int | None,
    from_beginning: bool,
    out: TextIO,
) -> int:
    async with aiohttp.ClientSession() as session:
        decoder = Decoder(default_store(), registry_client(kafka, session))
        async for raw in read_topic(
            kafka,
            topic,
            from_beginning=from_beginning,
            idle_timeout=None if follow else 3.0,
            limit=limit,
        ):
            line: dict[str, Any] = {
                "topic": raw.topic,
                "partition": raw.partition,
                "offset": raw.offset,
                "key": raw.key.decode(errors="replace") if raw.key is not None else None,
                "headers": {k: v.decode(errors="replace") for k, v in raw.headers},
            }
            try:
                decoded = await decoder.decode(raw.value)
            except DecodeError as exc:
                line["error"] = str(exc)
            else:
                line["schema"] = decoded.name
                line["writer_version"] = decoded.writer_version
                line["record"] = (
                    CallReport.from_record(decoded.record).to_json()
                    if decoded.name == END_OF_CALL_REPORT
                    else decoded.record
                )
            out.write(orjson.dumps(line, default=str).decode() + "\n")
            out.flush()
    return 0
