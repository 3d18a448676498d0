"""How callstream's Kafka clients authenticate and encrypt: TLS, SASL, or both.

Managed Kafka (Confluent Cloud, Amazon MSK, Aiven, Redpanda Cloud) requires TLS and SASL,
and a self-run production cluster usually does too. Every Kafka client callstream makes
gets these options through `KafkaSettings.client_kwargs()`, so a setting here reaches the
ingress, the consumers, replay, dlq, tail and the bench alike.

The variable names follow the spelling the Kafka world uses (librdkafka, Kafka Connect,
Spring): KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME, ...
"""

from __future__ import annotations

import importlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiokafka.abc import AbstractTokenProvider
from aiokafka.helpers import create_ssl_context

from core.secret import Secret
from core.settings import SettingsError, env_bool, env_opt, env_str

PROTOCOLS: Final = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS: Final = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")


@dataclass(frozen=True)
class KafkaSecurity:
    protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    # "package.module:factory": called with no arguments, returns an aiokafka
    # AbstractTokenProvider. The hook for OAUTHBEARER, whose tokens only the user's identity
    # provider can mint.
    sasl_oauth_token_provider: str | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: Secret | None = None
    ssl_check_hostname: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KafkaSecurity:
        security = cls(
            protocol=env_str(env, "KAFKA_SECURITY_PROTOCOL", "PLAINTEXT").upper(),
            sasl_mechanism=_upper(env_opt(env, "KAFKA_SASL_MECHANISM")),
            sasl_username=env_opt(env, "KAFKA_SASL_USERNAME"),
            sasl_password=_secret(env_opt(env, "KAFKA_SASL_PASSWORD")),
            sasl_oauth_token_provider=env_opt(env, "KAFKA_SASL_OAUTH_TOKEN_PROVIDER"),
            ssl_cafile=_path(env_opt(env, "KAFKA_SSL_CAFILE")),
            ssl_certfile=_path(env_opt(env, "KAFKA_SSL_CERTFILE")),
            ssl_keyfile=_path(env_opt(env, "KAFKA_SSL_KEYFILE")),
            ssl_key_password=_secret(env_opt(env, "KAFKA_SSL_KEY_PASSWORD")),
            ssl_check_hostname=env_bool(env, "KAFKA_SSL_CHECK_HOSTNAME", True),
        )
        security.check()
        return security

    @property
    def uses_tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    def check(self) -> None:
        """Refuse combinations no broker could accept, naming the variable to fix, at
        start-up rather than as a retry loop later."""
        if self.protocol not in PROTOCOLS:
            raise SettingsError(
                f"KAFKA_SECURITY_PROTOCOL={self.protocol!r} is not one of {', '.join(PROTOCOLS)}"
            )
        if self.uses_sasl:
            self._check_sasl()
        elif self.sasl_mechanism or self.sasl_username or self.sasl_password:
            raise SettingsError(
                f"KAFKA_SASL_* is set but KAFKA_SECURITY_PROTOCOL={self.protocol} does not use"
                " SASL: set it to SASL_SSL (or SASL_PLAINTEXT)"
            )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise SettingsError(
                "KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE go together (mutual TLS needs both)"
            )
        for name, path in (
            ("KAFKA_SSL_CAFILE", self.ssl_cafile),
            ("KAFKA_SSL_CERTFILE", self.ssl_certfile),
            ("KAFKA_SSL_KEYFILE", self.ssl_keyfile),
        ):
            if path is None:
                continue
            if not self.uses_tls:
                raise SettingsError(
                    f"{name} is set but KAFKA_SECURITY_PROTOCOL={self.protocol} does not use"
                    " TLS: set it to SSL or SASL_SSL"
                )
            if not path.is_file():
                raise SettingsError(f"{name}={path} is not a readable file")

    def _check_sasl(self) -> None:
        mechanism = self.sasl_mechanism
        if mechanism is None:
            raise SettingsError(
                f"KAFKA_SECURITY_PROTOCOL={self.protocol} needs KAFKA_SASL_MECHANISM"
                f" ({', '.join(MECHANISMS)})"
            )
        if mechanism not in MECHANISMS:
            raise SettingsError(
                f"KAFKA_SASL_MECHANISM={mechanism!r} is not one of {', '.join(MECHANISMS)}"
            )
        if mechanism == "OAUTHBEARER":
            if not self.sasl_oauth_token_provider:
                raise SettingsError(
                    "KAFKA_SASL_MECHANISM=OAUTHBEARER needs KAFKA_SASL_OAUTH_TOKEN_PROVIDER"
                    " (module:factory returning an aiokafka AbstractTokenProvider)"
                )
        elif not self.sasl_username or not self.sasl_password:
            raise SettingsError(
                f"KAFKA_SASL_MECHANISM={mechanism} needs KAFKA_SASL_USERNAME and"
                " KAFKA_SASL_PASSWORD"
            )

    def client_kwargs(self) -> dict[str, Any]:
        """The aiokafka keyword arguments for this security set-up."""
        kwargs: dict[str, Any] = {"security_protocol": self.protocol}
        if self.uses_tls:
            kwargs["ssl_context"] = self.ssl_context()
        if self.uses_sasl:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            if self.sasl_mechanism == "OAUTHBEARER":
                kwargs["sasl_oauth_token_provider"] = self._token_provider()
            else:
                assert self.sasl_password is not None
                kwargs["sasl_plain_username"] = self.sasl_username
                kwargs["sasl_plain_password"] = self.sasl_password.reveal()
        return kwargs

    def ssl_context(self) -> ssl.SSLContext:
        """The system's trust store unless a CA file is given; hostname checks stay on
        unless switched off explicitly."""
        password = self.ssl_key_password.reveal() if self.ssl_key_password else None
        context: ssl.SSLContext = create_ssl_context(
            cafile=self.ssl_cafile,
            certfile=self.ssl_certfile,
            keyfile=self.ssl_keyfile,
            password=password,
        )
        context.check_hostname = self.ssl_check_hostname
        return context

    def _token_provider(self) -> AbstractTokenProvider:
        assert self.sasl_oauth_token_provider is not None
        module_name, _, factory_name = self.sasl_oauth_token_provider.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), factory_name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise SettingsError(
                f"KAFKA_SASL_OAUTH_TOKEN_PROVIDER={self.sasl_oauth_token_provider!r} cannot be"
                f" loaded: {exc}"
            ) from exc
        provider = factory()
        if not isinstance(provider, AbstractTokenProvider):
            raise SettingsError(
                f"KAFKA_SASL_OAUTH_TOKEN_PROVIDER={self.sasl_oauth_token_provider!r} returned"
                f" {type(provider).__name__}, not an aiokafka AbstractTokenProvider"
            )
        return provider


def _upper(value: str | None) -> str | None:
    return value.upper() if value else None


def _secret(value: str | None) -> Secret | None:
    return Secret(value) if value else None


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None
