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
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal, Self

from aiokafka.abc import AbstractTokenProvider
from aiokafka.helpers import create_ssl_context

from core.secret import Secret
from core.settings import EnvSettings, SettingsError, setting, settings_class

Protocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
Mechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]
MECHANISMS: Final = typing.get_args(Mechanism)


@settings_class
class KafkaSecurity(EnvSettings):
    protocol: Protocol = setting(
        "KAFKA_SECURITY_PROTOCOL",
        default="PLAINTEXT",
        doc="How clients talk to the brokers: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL "
        "(managed services: SASL_SSL).",
    )
    sasl_mechanism: Mechanism | None = setting(
        "KAFKA_SASL_MECHANISM",
        default=None,
        doc="With SASL_*: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER.",
    )
    sasl_username: str | None = setting(
        "KAFKA_SASL_USERNAME", default=None, doc="SASL user (PLAIN and SCRAM)."
    )
    sasl_password: Secret | None = setting(
        "KAFKA_SASL_PASSWORD", default=None, secret=True, doc="SASL password (PLAIN and SCRAM)."
    )
    # The hook for OAUTHBEARER, whose tokens only the user's identity provider can mint.
    sasl_oauth_token_provider: str | None = setting(
        "KAFKA_SASL_OAUTH_TOKEN_PROVIDER",
        default=None,
        doc="With OAUTHBEARER: package.module:factory, called with no arguments, returning an "
        "aiokafka AbstractTokenProvider.",
    )
    ssl_cafile: Path | None = setting(
        "KAFKA_SSL_CAFILE",
        default=None,
        doc="PEM file of the CA(s) that signed the brokers' certificates. Empty: the system's "
        "trust store.",
    )
    ssl_certfile: Path | None = setting(
        "KAFKA_SSL_CERTFILE",
        default=None,
        doc="Client certificate (PEM) for mutual TLS; goes with KAFKA_SSL_KEYFILE.",
    )
    ssl_keyfile: Path | None = setting(
        "KAFKA_SSL_KEYFILE", default=None, doc="Client private key (PEM) for mutual TLS."
    )
    ssl_key_password: Secret | None = setting(
        "KAFKA_SSL_KEY_PASSWORD",
        default=None,
        secret=True,
        doc="Password of KAFKA_SSL_KEYFILE, if it is encrypted.",
    )
    ssl_check_hostname: bool = setting(
        "KAFKA_SSL_CHECK_HOSTNAME",
        default=True,
        doc="Check that a broker's certificate names the host connected to. Leave on.",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str], **given: Any) -> Self:
        security = super().from_env(env, **given)
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
