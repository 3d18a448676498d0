"""CALLSTREAM_KAFKA_COMPRESSION: the codec of the ingress's produce batches, zstd unless set
(docs/performance.md: large reports)."""

from __future__ import annotations

import pytest

from core.kafkasettings import KafkaSettings
from core.settings import SettingsError
from ingress.kafkapublisher import KafkaPublisher
from ingress.settings import IngressSettings

KAFKA = KafkaSettings(bootstrap_servers="127.0.0.1:9")


def test_the_codec_is_zstd_unless_set_and_an_unknown_one_stops_start_up() -> None:
    assert IngressSettings.from_env({}, kafka=KAFKA).kafka_compression == "zstd"
    env = {"CALLSTREAM_KAFKA_COMPRESSION": "lz4"}
    assert IngressSettings.from_env(env, kafka=KAFKA).kafka_compression == "lz4"
    with pytest.raises(SettingsError, match="CALLSTREAM_KAFKA_COMPRESSION"):
        IngressSettings.from_env({"CALLSTREAM_KAFKA_COMPRESSION": "brotli"}, kafka=KAFKA)


@pytest.mark.parametrize(("setting", "codec"), [("zstd", "zstd"), ("none", None), ("lz4", "lz4")])
async def test_the_producer_compresses_with_the_codec_set(setting: str, codec: str | None) -> None:
    settings = IngressSettings.from_env({"CALLSTREAM_KAFKA_COMPRESSION": setting}, kafka=KAFKA)
    publisher = KafkaPublisher(KAFKA, compression=settings.kafka_compression)

    producer = publisher._new_producer()
    try:
        assert producer._compression_type == codec
    finally:
        await producer.stop()  # never started: nothing to flush, only closed
