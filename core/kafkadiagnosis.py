"""Why a Kafka client cannot connect, in one line that names the setting to fix.

aiokafka reports a rejected password, an untrusted certificate and a wrong protocol all as
"Unable to bootstrap", and logs the cause among its retries. A person starting callstream
wants the cause, so when bootstrapping fails this opens one connection of its own to each
bootstrap server and says what went wrong there.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aiokafka.conn import create_conn
from aiokafka.errors import (
    KafkaConnectionError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.protocol.metadata import MetadataRequest

from core.kafkasecurity import KafkaSecurity


class KafkaUnreachable(Exception):
    """Kafka cannot be reached with these settings, and retrying will not change that."""


def explain_now(bootstrap: str, security: KafkaSecurity) -> str | None:
    """`explain` on a loop of its own, for a command that has not started one yet."""
    with asyncio.Runner() as runner:
        runner.get_loop().set_exception_handler(_drop_failed_probe)
        return runner.run(explain(bootstrap, security))


def _drop_failed_probe(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # A probe refused after its handshake leaves the refusal in the stream's "closed"
    # future too, and whether Python reports that future as never retrieved depends on the
    # order the garbage collector finalises it in: a traceback after the one-line reason,
    # for a failure the reason already names.
    if not isinstance(context.get("exception"), OSError):
        loop.default_exception_handler(context)


async def explain(bootstrap: str, security: KafkaSecurity, timeout: float = 5.0) -> str | None:
    """A one-line reason, or None when a connection does succeed (the failure lies
    elsewhere) or no server gave a reason (it may still come up: worth retrying)."""
    for server in (part.strip() for part in bootstrap.split(",")):
        host, _, port = server.rpartition(":")
        if not host or not port.isdigit():
            return f"KAFKA_BOOTSTRAP_SERVERS: {server!r} is not host:port"
        reason = await _probe(host.strip("[]"), int(port), security, timeout)
        if reason != "unreachable":
            return reason
    return None


async def _probe(host: str, port: int, security: KafkaSecurity, timeout: float) -> str | None:
    where = f"{host}:{port}"
    # Outside the try: a CA or key file that cannot be loaded is its own error, not the
    # server's (the handlers below would blame the protocol, or call the server unreachable).
    # create_conn takes the client's own options under aiokafka's names.
    kwargs = security.client_kwargs()
    try:
        async with asyncio.timeout(timeout):
            conn = await create_conn(host, port, request_timeout_ms=int(timeout * 1000), **kwargs)
    except SaslAuthenticationFailed:
        return (
            f"Kafka at {where} rejected the SASL credentials: check KAFKA_SASL_USERNAME and"
            f" KAFKA_SASL_PASSWORD (mechanism KAFKA_SASL_MECHANISM={security.sasl_mechanism})"
        )
    except UnsupportedSaslMechanismError as exc:
        return f"Kafka at {where} does not accept KAFKA_SASL_MECHANISM: {exc}"
    except ssl.SSLCertVerificationError as exc:
        return (
            f"the TLS certificate of Kafka at {where} is not trusted ({exc.verify_message}):"
            " set KAFKA_SSL_CAFILE to the CA that signed it"
        )
    except ssl.SSLError as exc:
        return (
            f"TLS with Kafka at {where} failed ({exc.reason}): check KAFKA_SECURITY_PROTOCOL="
            f"{security.protocol} against the listener's protocol"
        )
    except KafkaConnectionError:
        return _closed(where, security)
    except (TimeoutError, ConnectionError, OSError):
        return "unreachable"
    except (AssertionError, EOFError):
        # aiokafka's SASL handshake asserts on a reply that is not one: the listener does
        # not speak the protocol asked for.
        return (
            f"Kafka at {where} did not answer as a {security.protocol} listener: check"
            " KAFKA_SECURITY_PROTOCOL"
        )
    try:
        # With mutual TLS the server refuses a missing certificate only after the handshake,
        # on the first request (TLS 1.3), so one request is what proves the connection.
        async with asyncio.timeout(timeout):
            await conn.send(MetadataRequest([]))
    except Exception:  # whatever the first request dies of, it is the diagnosis
        return _closed(where, security)
    finally:
        conn.close()
    return None


def _closed(where: str, security: KafkaSecurity) -> str:
    if security.uses_tls and security.ssl_certfile is None:
        # The server's "certificate required" alert rarely reaches the client: all it sees
        # is the connection closing after the handshake.
        return (
            f"Kafka at {where} closed the TLS connection after the handshake, as a listener"
            " that wants a client certificate does: set KAFKA_SSL_CERTFILE and"
            " KAFKA_SSL_KEYFILE (mutual TLS)"
        )
    return "unreachable"
