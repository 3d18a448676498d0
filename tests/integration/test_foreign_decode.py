"""A consumer that is not Python can read the topic with nothing but the .avsc files.

The sample goes in through the real ingress; kcat (librdkafka, from Debian) takes the raw
record value off the topic; a small Java program (Apache Avro 1.12 from Maven Central,
tests/support/javaavro) checks the single-object marker, finds the schema by its
CRC-64-AVRO fingerprint among schemas/avro/*.avsc, decodes and prints JSON. Nothing from
callstream takes part in reading. kcat, java and mvn missing fail the test: they are
installed by scripts/install-system-deps and the JDK the local broker already needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.kafkasettings import KafkaSettings
from core.signing import WEBHOOK_PATH
from tests.conftest import TEST_SECRET, Client
from tests.signing import signed
from tests.support.paths import REPO
from tests.support.samples import SAMPLE
from tests.support.topics import read_back

JAVA_SOURCES = REPO / "tests" / "support" / "javaavro"
SCHEMAS = REPO / "schemas" / "avro"
MVN_TIMEOUT = 600.0


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not on PATH; run scripts/install-system-deps as root"
    return path


def _cache_root() -> Path:
    env = os.environ.get("CALLSTREAM_CACHE_DIR", "").strip()
    return Path(env) if env else Path.home() / ".cache" / "callstream"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def decoder_jar() -> Path:
    """The built decoder, once per machine and per version of its sources.

    The jar's name carries a hash of the pom and the source, so editing either builds
    afresh; the jar is moved into place whole, so its presence means a finished build.
    """
    digest = hashlib.sha256()
    for name in ("pom.xml", "Decode.java"):
        digest.update((JAVA_SOURCES / name).read_bytes())
    root = _cache_root()
    jar = root / f"javaavro-decode-{digest.hexdigest()[:16]}.jar"
    if jar.is_file():
        return jar
    mvn = _tool("mvn")
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".javaavro.lock"):
        if jar.is_file():  # built by another session while we waited
            return jar
        build = Path(tempfile.mkdtemp(prefix=".javaavro-", dir=root))
        try:
            for name in ("pom.xml", "Decode.java"):
                shutil.copy(JAVA_SOURCES / name, build / name)
            done = subprocess.run(
                [mvn, "-q", "-B", "-Dstyle.color=never", "package"],
                cwd=build,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=MVN_TIMEOUT,
                check=False,
            )
            assert done.returncode == 0, f"mvn package failed:\n{done.stdout}\n{done.stderr}"
            os.replace(build / "target" / "decode.jar", jar)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return jar


@pytest.fixture(scope="session")
def java_decoder() -> Path:
    _tool("java")
    return decoder_jar()


async def run(*argv: str, stdout: Any = asyncio.subprocess.PIPE) -> tuple[int, bytes, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=stdout, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out or b"", err.decode(errors="replace")


async def test_java_decodes_what_the_ingress_published(
    ingress: Client, kafka: KafkaSettings, java_decoder: Path, tmp_path: Path
) -> None:
    kcat = _tool("kcat")
    body = SAMPLE.read_bytes()
    resp = await ingress.post(WEBHOOK_PATH, data=body, headers=signed(body, TEST_SECRET))
    assert resp.status == 202, await resp.text()
    [landed] = await read_back(kafka, kafka.topic, expect=1)

    raw = tmp_path / "record.bin"
    with raw.open("wb") as sink:
        code, _, err = await run(
            kcat,
            "-C",
            "-b",
            kafka.bootstrap_servers,
            "-t",
            kafka.topic,
            "-o",
            "beginning",
            "-c",
            "1",
            "-e",
            "-f",
            "%s",
            stdout=sink,
        )
    assert code == 0, err
    assert raw.read_bytes() == landed.raw.value, "kcat must hand over the value untouched"

    code, out, err = await run("java", "-jar", str(java_decoder), str(raw), str(SCHEMAS))
    assert code == 0, err
    assert "schema: end_of_call_report.v3.avsc" in err
    record = orjson.loads(out)
    sample = orjson.loads(body)
    assert record["call_id"] == sample["callId"]
    assert record["from_number"] == sample["fromCaller"]
    assert record["duration_seconds"] == sample["callLengthSeconds"]
    assert orjson.loads(record["structured_data_json"]) == sample["analysis"]["structuredData"]
    assert record["event_time"] == sample["eventTimestamp"]
    assert record["source"]["format"] == "FLAT"


async def test_java_decoder_refuses_bytes_without_the_marker(
    java_decoder: Path, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b'{"callId": "not avro at all"}')
    code, _, err = await run("java", "-jar", str(java_decoder), str(junk), str(SCHEMAS))
    assert code == 2
    assert "no C3 01 marker" in err
