"""Ingress settings, read once from the environment at start-up."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Literal

import orjson

from core.kafkasettings import KafkaSettings
from core.secret import Secret
from core.settings import EnvSettings, SettingsError, declared, setting, settings_class
from ingress.spool import CrashPoint

# The codecs aiokafka offers for a produce batch ("none": uncompressed).
Compression = Literal["none", "gzip", "snappy", "lz4", "zstd"]

# The settings that hold a JSON object to answer a request-response event with.
JSON_REPLIES = (
    "assistant_request_reply",
    "flat_assistant_request_reply",
    "vapi_assistant_request_reply",
    "transfer_destination_reply",
    "knowledge_base_reply",
)


@settings_class
class IngressSettings(EnvSettings):
    kafka: KafkaSettings
    host: str = setting(
        "CALLSTREAM_INGRESS_HOST",
        default="0.0.0.0",  # noqa: S104 - a webhook receiver listens for the outside world
        doc="Address the webhook server listens on.",
    )
    port: int = setting(
        "CALLSTREAM_INGRESS_PORT",
        default=8080,
        doc="Port of /webhooks/flireo, /healthz, /readyz and /metrics (also the default for "
        "`callstream send`).",
    )
    # Empty means one process per core: a single asyncio process keeps at most one core busy.
    workers: int | None = setting(
        "CALLSTREAM_INGRESS_WORKERS",
        default=None,
        minimum=1,
        doc="Ingress processes sharing the port (SO_REUSEPORT), each with its own Kafka producer "
        "and spool directory <spool dir>/worker-<i>; 1: one process using the spool directory "
        "itself. Empty: the number of cores.",
    )
    webhook_secrets: tuple[Secret, ...] = setting(
        "CALLSTREAM_WEBHOOK_SECRET",
        default=(),
        secret=True,
        doc="HMAC secret(s) Flireo signs webhooks with; comma-separate two while rotating. "
        "Empty: no HMAC.",
    )
    shared_tokens: tuple[Secret, ...] = setting(
        "CALLSTREAM_SHARED_TOKEN",
        default=(),
        secret=True,
        doc="Shared bearer token(s), comma-separated, for senders that cannot sign. Both empty: "
        "NO AUTH.",
    )
    signature_tolerance_seconds: int = setting(
        "CALLSTREAM_SIGNATURE_TOLERANCE_SECONDS",
        default=300,
        minimum=1,
        doc="How old (seconds) a signed request's timestamp may be.",
    )
    replay_detection: bool = setting(
        "CALLSTREAM_REPLAY_DETECTION",
        default=True,
        doc="A signed request sent again within the tolerance gets the first answer and is "
        "not published again. Off only where something in front already drops replays.",
    )
    # A two-hour call's transcript is ~150 kB; Kafka's default record limit is 1 MiB.
    max_body_bytes: int = setting(
        "CALLSTREAM_MAX_BODY_BYTES",
        default=1_000_000,
        minimum=1024,
        doc="Largest accepted request body in bytes, as sent (Kafka's default record limit is "
        "1 MiB).",
    )
    max_json_depth: int = setting(
        "CALLSTREAM_MAX_JSON_DEPTH", default=64, minimum=2, doc="Deepest JSON nesting accepted."
    )
    body_timeout_seconds: float = setting(
        "CALLSTREAM_BODY_TIMEOUT_SECONDS",
        default=10.0,
        minimum=0.1,
        doc="Seconds a client gets to send the whole body.",
    )
    # -- request hygiene: what one client (or many) may hold (docs/operations.md) -------------
    header_timeout_seconds: float = setting(
        "CALLSTREAM_HEADER_TIMEOUT_SECONDS",
        default=10.0,
        minimum=0.1,
        doc="Seconds from a request's first byte until its line and headers are all in; past "
        "it the connection is closed (a client trickling its headers).",
    )
    # Above the 60 s idle timeout common load balancers use, so the ingress is not the side
    # that closes a connection the balancer is about to reuse.
    keepalive_timeout_seconds: float = setting(
        "CALLSTREAM_KEEPALIVE_TIMEOUT_SECONDS",
        default=75.0,
        minimum=0.1,
        doc="Seconds a connection may wait for its next request's headers, from connecting or "
        "from the previous response; then it is closed. Keep it above any proxy's idle timeout.",
    )
    max_connections: int = setting(
        "CALLSTREAM_MAX_CONNECTIONS",
        default=1000,
        minimum=1,
        doc="Open client connections served at once; a webhook on a connection past it gets "
        "503 with Retry-After as soon as its headers arrive. Keep it under the open-files limit.",
    )
    # 64 max-size bodies, or a few hundred ordinary reports (~150 kB for a two-hour call).
    max_inflight_body_bytes: int = setting(
        "CALLSTREAM_MAX_INFLIGHT_BODY_BYTES",
        default=64 * 1024 * 1024,
        minimum=1024,
        doc="Bytes of request bodies held at once across all requests; a body that would pass "
        "it gets 503 with Retry-After.",
    )
    publish_timeout_seconds: float = setting(
        "CALLSTREAM_PUBLISH_TIMEOUT_SECONDS",
        default=10.0,
        minimum=0.1,
        doc="Seconds a report may take to become durable (Kafka, then the spool) before a 503.",
    )
    kafka_ack_deadline_seconds: float = setting(
        "CALLSTREAM_KAFKA_ACK_DEADLINE_SECONDS",
        default=2.0,
        minimum=0.05,
        doc="Seconds to wait for Kafka's acknowledgement before the report goes to the local "
        "spool.",
    )
    # aiokafka compresses on the ingress's event loop, so the codec is CPU every report pays
    # for: per long call (a 105 kB record) zstd takes 70 µs against lz4's 444 µs (aiokafka's
    # lz4 is level 9) and puts a quarter of the bytes on the wire (docs/performance.md:
    # large reports). lz4 or none for consumers whose Kafka client has no zstd (before 2.1).
    kafka_compression: Compression = setting(
        "CALLSTREAM_KAFKA_COMPRESSION",
        default="zstd",
        doc="Codec of the batches the ingress produces: zstd, lz4, snappy, gzip or none. Every "
        "consumer's Kafka client must read it.",
    )
    # None (settings built in code, i.e. tests): a private temporary spool, removed at stop.
    # Two live processes must never share a spool directory; from_env gives the real default,
    # relative to the working directory, beside the local broker's home (.callstream/).
    spool_dir: Path | None = setting(
        "CALLSTREAM_SPOOL_DIR",
        default=None,
        unset=Path(".callstream/spool"),
        doc="The durable spool (fsync'd before the 2xx) used while Kafka is away; drained in "
        "order.",
    )
    spool_max_bytes: int = setting(
        "CALLSTREAM_SPOOL_MAX_BYTES",
        default=1024 * 1024 * 1024,
        minimum=64 * 1024,
        doc="Most bytes the spool may hold; past it the ingress answers 503 with Retry-After.",
    )
    # A spool this old means Kafka has been gone for a day: refuse (503) rather than keep
    # promising delivery nobody is watching.
    spool_max_age_seconds: float = setting(
        "CALLSTREAM_SPOOL_MAX_AGE_SECONDS",
        default=24 * 3600.0,
        minimum=1.0,
        doc="Oldest a spooled report may get (seconds); past it new reports get 503 with "
        "Retry-After.",
    )
    spool_segment_bytes: int = setting(
        "CALLSTREAM_SPOOL_SEGMENT_BYTES",
        default=64 * 1024 * 1024,
        minimum=4096,
        doc="Spool segment file size in bytes.",
    )
    test_crash_at: CrashPoint | None = setting(
        "CALLSTREAM_TEST_CRASH_AT",
        default=None,
        doc="Test builds only: crash (exit 99) at a named point of the spool write or drain "
        "(spool-after-write-before-fsync, spool-after-fsync-before-response, "
        "drain-after-publish-before-delete). Leave empty.",
    )
    rate_limit_per_second: float = setting(
        "CALLSTREAM_RATE_LIMIT_PER_SECOND",
        default=0.0,
        doc="Webhook posts per second allowed from one source address (token bucket). 0: no "
        "limit. Flireo posts a whole account's reports from a few addresses: set it above that "
        "peak.",
    )
    rate_limit_burst: int = setting(
        "CALLSTREAM_RATE_LIMIT_BURST",
        default=0,
        doc="Posts a source may send at once before the rate applies. 0: one second's worth "
        "(at least 1).",
    )
    # Only behind a proxy that sets X-Forwarded-For: otherwise any client could pick its bucket.
    trust_forwarded_for: bool = setting(
        "CALLSTREAM_TRUST_FORWARDED_FOR",
        default=False,
        doc="Take the source from the last X-Forwarded-For entry (only behind a proxy that sets "
        "it).",
    )

    # -- answers to request-response events (ingress/replies.py; formats.md §4, §5) -----------
    # Flireo gives an assistant-request 5 s (flat: every webhook), a Vapi one 7.5 s; Vapi's
    # other requests 20 s. The event is made durable before the answer, within this budget.
    reply_deadline_seconds: float = setting(
        "CALLSTREAM_REPLY_DEADLINE_SECONDS",
        default=4.0,
        minimum=0.1,
        doc="Seconds a request-response event (assistant-request, tool-calls, ...) may take to "
        "become durable before its answer; past it, 503. Keep it under the sender's 5 s.",
    )
    assistant_request_reply: str = setting(
        "CALLSTREAM_ASSISTANT_REQUEST_REPLY",
        default="{}",
        doc="JSON object answering a nested Flireo assistant-request. {}: use the saved agent "
        "(Flireo's documented neutral answer).",
    )
    flat_assistant_request_reply: str | None = setting(
        "CALLSTREAM_FLAT_ASSISTANT_REQUEST_REPLY",
        default=None,
        doc="JSON object (a full assistant configuration) answering a flat Flireo "
        "assistant-request. Empty: 422, as the flat docs have no neutral answer.",
    )
    vapi_assistant_request_reply: str | None = setting(
        "CALLSTREAM_VAPI_ASSISTANT_REQUEST_REPLY",
        default=None,
        doc='JSON object answering a Vapi assistant-request, e.g. {"assistantId":"..."}. Empty: '
        "422 (an empty answer would end the call).",
    )
    transfer_destination_reply: str | None = setting(
        "CALLSTREAM_TRANSFER_DESTINATION_REPLY",
        default=None,
        doc="JSON object answering a Vapi transfer-destination-request. Empty: 422 (no neutral "
        "answer is documented).",
    )
    # Empty by default rather than the JSON itself: a shell sourcing .env would strip the
    # quotes out of an unquoted JSON value.
    knowledge_base_reply: str | None = setting(
        "CALLSTREAM_KNOWLEDGE_BASE_REPLY",
        default=None,
        doc='JSON object answering a Vapi knowledge-base-request. Empty: {"documents": []}, no '
        "documents.",
    )
    tool_call_reply: str = setting(
        "CALLSTREAM_TOOL_CALL_REPLY",
        default="This tool is not available.",
        doc="What each tool call of a tool-calls event is answered with (as its error, or as "
        "its result where the format documents no error).",
    )

    def __post_init__(self) -> None:
        # A reply that is not a JSON object would fail every call it answers: refuse it at
        # start-up, naming the variable.
        declarations = declared(type(self))
        for name in JSON_REPLIES:
            text = getattr(self, name)
            with contextlib.suppress(orjson.JSONDecodeError):
                if text is None or isinstance(orjson.loads(text), dict):
                    continue
            # Not JSON, or JSON but not an object.
            raise SettingsError(f"{declarations[name].env} must be a JSON object, e.g. {{}}")

    @property
    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1
