"""Files of the local broker and cluster that hold the SCRAM password are never readable by
other users, not even for the moment between writing and renaming them into place."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from callstream.localcluster import LocalCluster
from callstream.localkafka import atomic_write
from callstream.localtls import ensure_tls_files


@pytest.fixture(autouse=True)
def _usual_umask() -> Iterator[None]:
    # The usual 022: without the fix, a new file is then readable by everyone.
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes_at_rename(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    seen: dict[str, int] = {}
    replace = Path.replace

    def recording(self: Path, target: str | os.PathLike[str]) -> Path:
        seen[Path(target).name] = stat.S_IMODE(self.stat().st_mode)
        return replace(self, target)

    monkeypatch.setattr(Path, "replace", recording)
    return seen


def test_the_cluster_layout_with_its_password_is_private_from_the_first_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _modes_at_rename(monkeypatch)

    LocalCluster(tmp_path / "cluster", brokers=3, security="sasl_ssl").layout()

    assert seen == {"cluster.json": 0o600}
    assert stat.S_IMODE((tmp_path / "cluster" / "cluster.json").stat().st_mode) == 0o600


def test_a_broker_file_written_in_place_is_private_and_replaces_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _modes_at_rename(monkeypatch)
    config = tmp_path / "node-1" / "server.properties"

    atomic_write(config, "sasl.jaas.config=... password=old\n")
    atomic_write(config, "sasl.jaas.config=... password=new\n")

    assert seen == {"server.properties": 0o600}
    assert config.read_text() == "sasl.jaas.config=... password=new\n"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert [p.name for p in config.parent.iterdir()] == ["server.properties"]


def test_a_missing_client_key_is_made_again_with_the_certificates_it_belongs_to(
    tmp_path: Path,
) -> None:
    first = ensure_tls_files(tmp_path / "tls")
    first.client_key.unlink()

    again = ensure_tls_files(tmp_path / "tls")

    assert again.client_key.is_file()
    assert stat.S_IMODE(again.client_key.stat().st_mode) & 0o077 == 0
    # The key and the certificate are one pair: openssl derives the same public key from both.
    public = [
        subprocess.run(["openssl", *argv], capture_output=True, check=True).stdout
        for argv in (
            ("pkey", "-pubout", "-in", again.client_key),
            ("x509", "-pubkey", "-noout", "-in", again.client_cert),
        )
    ]
    assert public[0] == public[1]
