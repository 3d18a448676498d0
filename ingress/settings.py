"""Ingress settings, read once from the environment at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from core.kafkasettings import KafkaSettings
from core.secret import Secret, secrets_from
from core.settings import SettingsError, env_bool, env_float, env_int, env_opt, env_str
from ingress.spool import CRASH_POINTS, CrashPoint

# Relative to the working directory, beside the local broker's home (.callstream/).
DEFAULT_SPOOL_DIR = ".callstream/spool"


@dataclass(frozen=True)
class IngressSettings:
    kafka: KafkaSettings
    host: str = "0.0.0.0"  # noqa: S104 - a webhook receiver listens for the outside world
    port: int = 8080
    webhook_secrets: tuple[Secret, ...] = field(default=())
    shared_tokens: tuple[Secret, ...] = field(default=())
    signature_tolerance_seconds: int = 300
    # A two-hour call's transcript is ~150 kB; Kafka's default record limit is 1 MiB.
    max_body_bytes: int = 1_000_000
    max_json_depth: int = 64
    body_timeout_seconds: float = 10.0
    # The whole budget to make a report durable (Kafka, then the spool's fsync); past it, 503.
    publish_timeout_seconds: float = 10.0
    # Kafka gets this long to acknowledge (acks=all) before the report goes to the spool.
    kafka_ack_deadline_seconds: float = 2.0
    # None (settings built in code, i.e. tests): a private temporary spool, removed at stop.
    # Two live processes must never share a spool directory; from_env gives the real default.
    spool_dir: Path | None = None
    spool_max_bytes: int = 1024 * 1024 * 1024
    # A spool this old means Kafka has been gone for a day: refuse (503) rather than keep
    # promising delivery nobody is watching.
    spool_max_age_seconds: float = 24 * 3600.0
    spool_segment_bytes: int = 64 * 1024 * 1024
    # Fault-injection for the crash tests only: the process exits (99) at this point.
    test_crash_at: CrashPoint | None = None
    # Per-source limit on webhook posts; 0 is off. Flireo posts a whole account's reports from
    # a few addresses, so a limit must sit above that account's peak or it refuses real reports.
    rate_limit_per_second: float = 0.0
    # 0: one second's worth of requests (at least 1).
    rate_limit_burst: int = 0
    # Only behind a proxy that sets X-Forwarded-For: otherwise any client could pick its bucket.
    trust_forwarded_for: bool = False

    @property
    def authentication_required(self) -> bool:
        return bool(self.webhook_secrets or self.shared_tokens)

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, kafka: KafkaSettings) -> IngressSettings:
        return cls(
            kafka=kafka,
            host=env_str(env, "CALLSTREAM_INGRESS_HOST", cls.host),
            port=env_int(env, "CALLSTREAM_INGRESS_PORT", cls.port),
            webhook_secrets=secrets_from(env.get("CALLSTREAM_WEBHOOK_SECRET")),
            shared_tokens=secrets_from(env.get("CALLSTREAM_SHARED_TOKEN")),
            signature_tolerance_seconds=env_int(
                env,
                "CALLSTREAM_SIGNATURE_TOLERANCE_SECONDS",
                cls.signature_tolerance_seconds,
                minimum=1,
            ),
            max_body_bytes=env_int(
                env, "CALLSTREAM_MAX_BODY_BYTES", cls.max_body_bytes, minimum=1024
            ),
            max_json_depth=env_int(env, "CALLSTREAM_MAX_JSON_DEPTH", cls.max_json_depth, minimum=2),
            body_timeout_seconds=env_float(
                env, "CALLSTREAM_BODY_TIMEOUT_SECONDS", cls.body_timeout_seconds, minimum=0.1
            ),
            publish_timeout_seconds=env_float(
                env, "CALLSTREAM_PUBLISH_TIMEOUT_SECONDS", cls.publish_timeout_seconds, minimum=0.1
            ),
            kafka_ack_deadline_seconds=env_float(
                env,
                "CALLSTREAM_KAFKA_ACK_DEADLINE_SECONDS",
                cls.kafka_ack_deadline_seconds,
                minimum=0.05,
            ),
            spool_dir=Path(env_str(env, "CALLSTREAM_SPOOL_DIR", DEFAULT_SPOOL_DIR)),
            spool_max_bytes=env_int(
                env, "CALLSTREAM_SPOOL_MAX_BYTES", cls.spool_max_bytes, minimum=64 * 1024
            ),
            spool_max_age_seconds=env_float(
                env, "CALLSTREAM_SPOOL_MAX_AGE_SECONDS", cls.spool_max_age_seconds, minimum=1.0
            ),
            spool_segment_bytes=env_int(
                env, "CALLSTREAM_SPOOL_SEGMENT_BYTES", cls.spool_segment_bytes, minimum=4096
            ),
            test_crash_at=_crash_point(env_opt(env, "CALLSTREAM_TEST_CRASH_AT")),
            rate_limit_per_second=env_float(
                env, "CALLSTREAM_RATE_LIMIT_PER_SECOND", cls.rate_limit_per_second
            ),
            rate_limit_burst=env_int(env, "CALLSTREAM_RATE_LIMIT_BURST", cls.rate_limit_burst),
            trust_forwarded_for=env_bool(
                env, "CALLSTREAM_TRUST_FORWARDED_FOR", cls.trust_forwarded_for
            ),
        )


def _crash_point(raw: str | None) -> CrashPoint | None:
    if raw is None:
        return None
    if raw not in CRASH_POINTS:
        raise SettingsError(
            f"CALLSTREAM_TEST_CRASH_AT={raw!r} is not one of {', '.join(CRASH_POINTS)}"
        )
    return raw
