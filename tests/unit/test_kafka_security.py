"""Kafka security settings: every variable in the Kafka world's spelling, combinations no
broker could accept refused at start-up with the variable named, secrets never printed."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from core.kafkadiagnosis import explain
from core.kafkasecurity import KafkaSecurity
from core.settings import SettingsError

SCRAM = {
    "KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
    "KAFKA_SASL_MECHANISM": "scram-sha-512",
    "KAFKA_SASL_USERNAME": "callstream",
    "KAFKA_SASL_PASSWORD": "hunter2-very-secret",
}


def test_plaintext_is_the_default_and_adds_only_the_protocol() -> None:
    security = KafkaSecurity.from_env({})
    assert security.client_kwargs() == {"security_protocol": "PLAINTEXT"}


def test_sasl_ssl_with_scram_reaches_the_client_and_never_prints_the_password() -> None:
    security = KafkaSecurity.from_env(SCRAM)
    kwargs = security.client_kwargs()
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "callstream"
    assert kwargs["sasl_plain_password"] == "hunter2-very-secret"
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert "hunter2" not in repr(security)
    assert "hunter2" not in str(security)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "KAFKA_SASL_MECHANISM"),
        (SCRAM | {"KAFKA_SASL_MECHANISM": "GSSAPI"}, "KAFKA_SASL_MECHANISM"),
        (SCRAM | {"KAFKA_SASL_PASSWORD": ""}, "KAFKA_SASL_PASSWORD"),
        (SCRAM | {"KAFKA_SECURITY_PROTOCOL": "SSL"}, "KAFKA_SASL_"),
        (SCRAM | {"KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"}, "KAFKA_SSL_CAFILE"),
        (SCRAM | {"KAFKA_SSL_CERTFILE": "/etc/hostname"}, "KAFKA_SSL_KEYFILE"),
        ({"KAFKA_SSL_CAFILE": "/etc/hostname"}, "KAFKA_SSL_CAFILE"),
        (SCRAM | {"KAFKA_SASL_MECHANISM": "OAUTHBEARER"}, "KAFKA_SASL_OAUTH_TOKEN_PROVIDER"),
        (SCRAM | {"KAFKA_SSL_CHECK_HOSTNAME": "maybe"}, "KAFKA_SSL_CHECK_HOSTNAME"),
    ],
)
def test_impossible_combinations_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named) as raised:
        KafkaSecurity.from_env(env)
    assert "hunter2" not in str(raised.value)


def test_a_token_provider_that_is_not_one_is_refused(tmp_path: Path) -> None:
    env = SCRAM | {
        "KAFKA_SASL_MECHANISM": "OAUTHBEARER",
        "KAFKA_SASL_OAUTH_TOKEN_PROVIDER": "pathlib:Path",
    }
    security = KafkaSecurity.from_env(env)
    with pytest.raises(SettingsError, match="not an aiokafka AbstractTokenProvider"):
        security.client_kwargs()


async def test_a_ca_file_that_holds_no_certificate_is_its_own_error_not_a_protocol_hint(
    tmp_path: Path,
) -> None:
    """Building the client's TLS context fails before any connection: the diagnosis must let
    that error through, not blame KAFKA_SECURITY_PROTOCOL (or call the server unreachable)."""
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    security = KafkaSecurity.from_env(
        {"KAFKA_SECURITY_PROTOCOL": "ssl", "KAFKA_SSL_CAFILE": str(ca)}
    )
    with pytest.raises(ssl.SSLError):
        await explain("127.0.0.1:1", security, timeout=2.0)
