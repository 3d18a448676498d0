"""The Kafka broker's jars, fetched once per Kafka version from Maven Central through
`callstream/kafka/pom.xml` into a per-user cache, and the Java that runs them."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from subprocess import DEVNULL, PIPE, STDOUT

from callstream.commandsettings import LocalBrokerSettings

KAFKA_VERSION = "4.1.1"

_POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
_MARKER = ".complete"
_MVN_TIMEOUT_S = 900.0


class LocalKafkaError(RuntimeError):
    """The local broker or its jars could not be provided; the message carries the evidence."""


def jar_cache_dir(version: str = KAFKA_VERSION) -> Path:
    root = (
        LocalBrokerSettings.from_env(os.environ).cache_dir or Path.home() / ".cache" / "callstream"
    )
    return root / f"kafka-{version}" / "libs"


def ensure_kafka_jars(version: str = KAFKA_VERSION) -> Path:
    """Return a directory holding the broker's runtime jars, downloading them once per version.

    The marker file is written inside the directory before it is renamed into place, so its
    presence means a complete download; once it exists mvn is never consulted again, which keeps
    later runs offline and fast.
    """
    libs = jar_cache_dir(version)
    if (libs / _MARKER).is_file():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LocalKafkaError(
            f"Kafka {version} jars are not cached in {libs} and Maven (mvn) is not on PATH to "
            "download them; install Maven or set KAFKA_BOOTSTRAP_SERVERS to use another broker"
        )
    with flocked(libs.parent / ".lock"):
        # Another process may have finished the download while we waited for the lock.
        if (libs / _MARKER).is_file():
            return libs
        tmp = Path(tempfile.mkdtemp(prefix=".libs-", dir=libs.parent))
        try:
            _download_jars(mvn, version, tmp)
            if libs.exists():
                # A directory without the marker is debris from an interrupted older layout.
                shutil.rmtree(libs)
            tmp.rename(libs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return libs


def _download_jars(mvn: str, version: str, dest: Path) -> None:
    cmd = [
        mvn,
        "-B",
        "-q",
        "-Dstyle.color=never",
        "-f",
        str(_POM),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={dest}",
        "-DincludeScope=runtime",
        f"-Dkafka.version={version}",
    ]
    out = run_tool(cmd, what=f"mvn fetching Kafka {version} jars", timeout=_MVN_TIMEOUT_S)
    main_jar = dest / f"kafka_2.13-{version}.jar"
    if not main_jar.is_file():
        raise LocalKafkaError(f"mvn succeeded but {main_jar.name} is missing:\n{tail_text(out)}")
    jars = sorted(p.name for p in dest.glob("*.jar"))
    (dest / _MARKER).write_text(f"kafka {version}\n" + "".join(f"{j}\n" for j in jars))


def run_tool(cmd: list[str], *, what: str, timeout: float, cwd: Path | None = None) -> str:
    """Run a build or Kafka tool to completion: its output, or LocalKafkaError with its tail."""
    try:
        # check=False, the default: a failure is reported below, with the tool's output.
        proc = subprocess.run(
            cmd, cwd=cwd, stdin=DEVNULL, stdout=PIPE, stderr=STDOUT, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else ""
        raise LocalKafkaError(
            f"{what} did not finish within {timeout:.0f}s:\n{tail_text(out)}"
        ) from exc
    out = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        raise LocalKafkaError(f"{what} failed (exit {proc.returncode}):\n{tail_text(out)}")
    return out


def find_java() -> str:
    java_home = os.environ.get("JAVA_HOME", "").strip()
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if found is None:
        raise LocalKafkaError(
            "no java found (JAVA_HOME unset or invalid, none on PATH); Kafka needs Java 17+"
        )
    return found


@contextlib.contextmanager
def flocked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Python opens files non-inheritable, so the broker JVM never holds this lock, and
    # closing the file releases it.
    with path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield


def tail_text(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])
