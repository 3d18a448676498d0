"""Ingress settings, read once from the environment at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from callstream.envparse import env_float, env_int, env_str
from callstream.kafkaconfig import KafkaSettings
from callstream.secret import Secret, secrets_from


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
    publish_timeout_seconds: float = 10.0

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
        )
