"""A real, Confluent-compatible schema registry that tests run as a local Java process.

The server is Apicurio Registry (``io.apicurio:apicurio-registry-app``, its Quarkus
application published on Maven Central as the ``all`` tar.gz), which serves the Confluent
Schema Registry REST API under ``/apis/ccompat/v7``. Storage is an in-memory H2 database,
so every start is an empty registry and nothing outlives ``stop()``.

The distribution is fetched once with ``mvn dependency:copy`` into
``$CALLSTREAM_CACHE_DIR`` (default ``~/.cache/callstream``), subdirectory
``schema-registry-<version>``, and marked complete; later runs never download.

Apicurio 3.3 is compiled for Java 21, so the server runs on the first Java >= 21 found:
``$CALLSTREAM_REGISTRY_JAVA`` (a ``java`` binary), ``$JAVA_HOME/bin/java``, ``java`` on
``PATH``, then the JDKs under ``/usr/lib/jvm``.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path

from callstream.lifecycle import StartStop
from callstream.ports import free_ports
from callstream.processes import ChildProcess

APICURIO_VERSION = "3.3.3"
MAVEN_ARTIFACT = f"io.apicurio:apicurio-registry-app:{APICURIO_VERSION}:tar.gz:all"
MIN_JAVA_MAJOR = 21
CCOMPAT_PATH = "/apis/ccompat/v7"
HEAP = "-Xmx384m"

_MARKER = ".callstream-complete"
_RUN_JAR = "quarkus-run.jar"
_LOG_TAIL_LINES = 60
_BIND_FAILURE = re.compile(r"Port\(s\) already bound|Address already in use")
# Readiness probes go straight to 127.0.0.1, whatever proxy the environment names.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def cache_root() -> Path:
    """The callstream download cache: ``$CALLSTREAM_CACHE_DIR`` or ``~/.cache/callstream``."""
    configured = os.environ.get("CALLSTREAM_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "callstream"


def ensure_registry_dist() -> Path:
    """Return the unpacked Apicurio Registry distribution, downloading it on first use only.

    The directory holds ``quarkus-run.jar``. A file lock serialises concurrent first runs,
    and the directory is moved into place only once it is complete.
    """
    root = cache_root()
    dist = root / f"schema-registry-{APICURIO_VERSION}"
    if (dist / _MARKER).is_file():
        return dist
    root.mkdir(parents=True, exist_ok=True)
    with (root / f"schema-registry-{APICURIO_VERSION}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dist / _MARKER).is_file():
            return dist
        if dist.exists():  # left over from an interrupted run: never trust it
            shutil.rmtree(dist)
        staging = Path(tempfile.mkdtemp(prefix=f".{dist.name}-", dir=root))
        staging.chmod(0o755)
        try:
            _download_and_unpack(staging)
            staging.rename(dist)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dist


def _download_and_unpack(staging: Path) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise RuntimeError("mvn is not on PATH: it is needed once to fetch " + MAVEN_ARTIFACT)
    download = staging / "download"
    unpacked = staging / "dist"
    proc = subprocess.run(
        [
            mvn,
            "-B",
            "-q",
            "dependency:copy",
            f"-Dartifact={MAVEN_ARTIFACT}",
            f"-DoutputDirectory={download}",
            "-Dmdep.overWriteReleases=true",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    archives = sorted(download.glob("*.tar.gz")) if download.is_dir() else []
    if proc.returncode != 0 or len(archives) != 1:
        output = (proc.stdout + proc.stderr).strip().splitlines()[-_LOG_TAIL_LINES:]
        raise RuntimeError(
            f"mvn could not fetch {MAVEN_ARTIFACT} (exit {proc.returncode}):\n" + "\n".join(output)
        )
    unpacked.mkdir()
    with tarfile.open(archives[0], "r:gz") as archive:
        archive.extractall(unpacked, filter="data")
    if not (unpacked / _RUN_JAR).is_file():
        raise RuntimeError(f"{archives[0].name} has no {_RUN_JAR} at its top level")
    (unpacked / _MARKER).write_text(MAVEN_ARTIFACT + "\n")
    # Move the finished tree up so that the staging directory itself becomes the dist.
    archives[0].unlink()
    shutil.rmtree(download)
    for child in unpacked.iterdir():
        child.rename(staging / child.name)
    unpacked.rmdir()


def _java_major(java: str) -> int | None:
    try:
        proc = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', proc.stderr + proc.stdout)
    if proc.returncode != 0 or match is None:
        return None
    major = int(match.group(1))
    if major == 1 and match.group(2) is not None:  # "1.8.0_392" style
        major = int(match.group(2))
    return major


@functools.cache
def find_java() -> str:
    """The first ``java`` binary of version >= 21 (see the module docstring for the order)."""
    explicit = os.environ.get("CALLSTREAM_REGISTRY_JAVA")
    if explicit:
        major = _java_major(explicit)
        if major is None or major < MIN_JAVA_MAJOR:
            raise RuntimeError(
                f"CALLSTREAM_REGISTRY_JAVA={explicit} is not a java >= {MIN_JAVA_MAJOR} "
                f"(version {major}); Apicurio Registry {APICURIO_VERSION} needs one"
            )
        return explicit
    candidates: list[str] = []
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidates.append(str(Path(java_home) / "bin" / "java"))
    on_path = shutil.which("java")
    if on_path:
        candidates.append(on_path)
    jvm_dir = Path("/usr/lib/jvm")
    if jvm_dir.is_dir():
        candidates.extend(str(p) for p in sorted(jvm_dir.glob("*/bin/java"), reverse=True))
    seen: list[str] = []
    for candidate in candidates:
        if candidate in seen:
            continue
        seen.append(candidate)
        major = _java_major(candidate)
        if major is not None and major >= MIN_JAVA_MAJOR:
            return candidate
    raise RuntimeError(
        f"Apicurio Registry {APICURIO_VERSION} needs Java >= {MIN_JAVA_MAJOR}; none found among "
        f"{seen or ['(no java at all)']}. Set CALLSTREAM_REGISTRY_JAVA to a java binary."
    )


_RUNNING: weakref.WeakSet[SchemaRegistryServer] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    """A test run that ends without ``stop()`` (a crash, a forgotten fixture) leaves no JVM."""
    for server in list(_RUNNING):
        server.stop()


class SchemaRegistryServer(StartStop):
    """One Apicurio Registry process, bound to 127.0.0.1 on free ports, with empty storage.

    ``start()`` returns the Confluent-compatible base URL (``http://127.0.0.1:PORT/apis/ccompat/v7``);
    the process's output goes to ``work_dir/schema-registry.log``.
    """

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.log_path = work_dir / "schema-registry.log"
        self._proc: ChildProcess | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the schema registry is not running")
        return self._url

    def start(self, timeout: float = 120) -> str:
        if self._proc is not None:
            raise RuntimeError("the schema registry is already started")
        dist = ensure_registry_dist()
        java = find_java()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            http_port, management_port = free_ports(2)
            self._spawn(java, dist, http_port, management_port)
            try:
                self._wait_ready(http_port, deadline)
            except _PortTaken:
                self.stop()
                if attempt == 2:
                    raise RuntimeError(self._failure("kept losing its ports")) from None
                continue
            except BaseException:
                self.stop()
                raise
            self._url = f"http://127.0.0.1:{http_port}{CCOMPAT_PATH}"
            return self._url
        raise AssertionError("unreachable")

    def _spawn(self, java: str, dist: Path, http_port: int, management_port: int) -> None:
        tmp = self.work_dir / "tmp"
        tmp.mkdir(exist_ok=True)
        command = [
            java,
            HEAP,
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            f"-Djava.io.tmpdir={tmp}",
            "-Dquarkus.http.host=127.0.0.1",
            f"-Dquarkus.http.port={http_port}",
            "-Dquarkus.management.host=127.0.0.1",
            f"-Dquarkus.management.port={management_port}",
            "-Dquarkus.log.console.color=false",
            f"-Dapicurio.storage.snapshot.location={tmp}",
            f"-Dapicurio.import.work-dir={tmp}",
            "-Dapicurio.datasource.jdbc.initial-size=2",
            "-Dapicurio.datasource.jdbc.min-size=2",
            "-Dapicurio.datasource.jdbc.max-size=20",
            "-jar",
            _RUN_JAR,
        ]
        with self.log_path.open("a") as log:
            log.write(f"\n--- {' '.join(command)}\n")
        self._proc = ChildProcess(
            command, cwd=dist, log_file=self.log_path, name="schema registry", new_session=True
        ).start()
        _RUNNING.add(self)

    def _wait_ready(self, http_port: int, deadline: float) -> None:
        assert self._proc is not None
        probe = f"http://127.0.0.1:{http_port}{CCOMPAT_PATH}/subjects"
        while True:
            code = self._proc.poll()
            if code is not None:
                if _BIND_FAILURE.search(self._log_tail()):
                    raise _PortTaken
                raise RuntimeError(self._failure(f"exited with code {code} while starting"))
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                _NO_PROXY.open(probe, timeout=2) as response,
            ):
                if response.status == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(self._failure("did not answer on the ccompat API in time"))
            time.sleep(0.25)

    def stop(self) -> None:
        _RUNNING.discard(self)
        proc, self._proc, self._url = self._proc, None, None
        if proc is not None:
            proc.stop(grace=20)

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    def _failure(self, what: str) -> str:
        return (
            f"Apicurio Registry {APICURIO_VERSION} {what}; last lines of {self.log_path}:\n"
            + self._log_tail()
        )


class _PortTaken(Exception):
    """The JVM lost a race for the port it was given; start again on new ports."""
