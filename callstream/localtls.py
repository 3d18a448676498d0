"""TLS material for a local secured Kafka cluster: a throwaway CA and one broker certificate.

Made with the openssl command line (Debian's `openssl`), kept under the cluster's home, and
valid for 127.0.0.1 and localhost only: enough for clients to verify the broker exactly as
they would verify a managed service, hostname check included.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import astuple, dataclass
from pathlib import Path

DAYS = "825"


class TlsError(RuntimeError):
    """openssl is missing or failed."""


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path  # what clients trust (KAFKA_SSL_CAFILE)
    keystore: Path  # the broker's PKCS#8 key and certificate chain, PEM
    client_cert: Path  # a client certificate signed by the same CA, for mutual TLS
    client_key: Path


def ensure_tls_files(directory: Path) -> TlsFiles:
    """Make the files once; later calls return the same ones (clients keep trusting them)."""
    files = TlsFiles(
        ca_cert=directory / "ca.pem",
        keystore=directory / "broker-keystore.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    if all(path.is_file() for path in astuple(files)):
        return files
    openssl = shutil.which("openssl")
    if openssl is None:
        raise TlsError("openssl is not installed (Debian package: openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = directory / "ca.key"
    _run(
        openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", DAYS,
        "-subj", "/CN=callstream local CA", "-keyout", ca_key, "-out", files.ca_cert,
    )  # fmt: skip
    broker_key, broker_cert = directory / "broker.key", directory / "broker.pem"
    _signed(openssl, directory, "localhost", broker_key, broker_cert, ca_key, files.ca_cert)
    _signed(
        openssl, directory, "callstream", files.client_key, files.client_cert, ca_key,
        files.ca_cert,
    )  # fmt: skip
    # Kafka reads a PEM keystore as an unencrypted PKCS#8 key followed by its certificate.
    pkcs8 = subprocess.run(
        [openssl, "pkcs8", "-topk8", "-nocrypt", "-in", str(broker_key)],
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    files.keystore.write_text(pkcs8 + broker_cert.read_text())
    for secret in (ca_key, broker_key, files.client_key, files.keystore):
        secret.chmod(0o600)
    return files


def _signed(
    openssl: str, directory: Path, name: str, key: Path, cert: Path, ca_key: Path, ca_cert: Path
) -> None:
    request = directory / f"{name}.csr"
    extensions = directory / f"{name}.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _run(openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
         "-keyout", key, "-out", request)  # fmt: skip
    _run(
        openssl, "x509", "-req", "-in", request, "-CA", ca_cert, "-CAkey", ca_key,
        "-CAcreateserial", "-days", DAYS, "-extfile", extensions, "-out", cert,
    )  # fmt: skip
    request.unlink()
    extensions.unlink()


def _run(*args: str | Path) -> None:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise TlsError(f"openssl {args[1]} failed: {done.stderr.strip()[-500:]}")
