"""callstream.localkafka runs a real Kafka broker: records go through it and survive restarts."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from callstream.localkafka import (
    KAFKA_VERSION,
    LocalKafka,
    LocalKafkaError,
    default_home,
    ensure_broker,
    ensure_kafka_jars,
    jar_cache_dir,
)
from tests.support.kafka import session_broker

# Includes formatting the storage in its own JVM, on a cold machine.
START_TIMEOUT = 120.0

BrokerFactory = Callable[..., LocalKafka]


@pytest.fixture
def brokers() -> Iterator[BrokerFactory]:
    """Hands out LocalKafka handles and stops every one at teardown, pass or fail."""
    made: list[LocalKafka] = []

    def make(home: Path, **kwargs: Any) -> LocalKafka:
        broker = LocalKafka(home, **kwargs)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.stop()
        assert _jvms_using(broker.home) == []


def _jvms_using(home: Path) -> list[int]:
    """Pids of any process whose command line names this home's server.properties."""
    needle = str(home / "server.properties").encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and b"kafka.Kafka" in cmdline:
            pids.append(int(proc.name))
    return pids


def _proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return _proc_state(pid) != "Z"


def _accepts(bootstrap: str) -> bool:
    host, port = bootstrap.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
    except OSError:
        return False
    return True


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


async def _produce(bootstrap: str, topic: str, *values: bytes) -> set[int]:
    """Sends with acks=all and returns the topic's partitions as the broker reports them."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value)
        partitions: set[int] = await producer.partitions_for(topic)
        return partitions
    finally:
        await producer.stop()


async def _consume(
    bootstrap: str, topic: str, want: int, group_id: str | None = None, timeout: float = 60.0
) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        values: list[bytes] = []
        async with asyncio.timeout(timeout):
            while len(values) < want:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    values.extend(record.value for record in records)
        return values
    finally:
        await consumer.stop()


def test_paths_follow_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CALLSTREAM_HOME", str(tmp_path / "home"))
    assert default_home() == tmp_path / "home"
    monkeypatch.delenv("CALLSTREAM_HOME")
    monkeypatch.chdir(tmp_path)
    assert default_home() == tmp_path / ".callstream"
    monkeypatch.setenv("CALLSTREAM_CACHE_DIR", str(tmp_path / "cache"))
    assert jar_cache_dir() == tmp_path / "cache" / f"kafka-{KAFKA_VERSION}" / "libs"


def test_cached_jars_never_run_maven(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    libs = ensure_kafka_jars()  # downloads only on a machine that has never run this
    assert (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file()
    # Without the slf4j binding the broker would run but log nothing.
    assert list(libs.glob("log4j-slf4j-impl-*.jar"))

    # A fake mvn that leaves a trace and fails: the cached path must not touch it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    trace = tmp_path / "mvn-called"
    fake = bin_dir / "mvn"
    fake.write_text(
        f'#!/bin/sh\necho "$@" >> {trace}\necho "BUILD FAILURE from fake mvn"\nexit 1\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert ensure_kafka_jars() == libs
    assert not trace.exists()

    # The same call against an empty cache does run mvn, so the pass above was the cache's doing;
    # mvn's failure surfaces with its output and leaves no half-filled cache behind.
    cold = tmp_path / "cold-cache"
    monkeypatch.setenv("CALLSTREAM_CACHE_DIR", str(cold))
    with pytest.raises(LocalKafkaError, match="BUILD FAILURE from fake mvn"):
        ensure_kafka_jars()
    assert "dependency:copy-dependencies" in trace.read_text()
    assert not jar_cache_dir().exists()
    assert [p.name for p in jar_cache_dir().parent.iterdir()] == [".lock"]

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("mvn") is None
    with pytest.raises(LocalKafkaError, match=r"Maven \(mvn\) is not on PATH"):
        ensure_kafka_jars()


async def test_records_survive_a_restart_on_the_same_port(
    brokers: BrokerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "kafka-home"  # where session_broker(tmp_path) keeps its broker
    broker = brokers(home)
    assert broker.status() is None

    bootstrap = await asyncio.to_thread(broker.start, START_TIMEOUT)
    status = broker.status()
    assert status is not None
    assert status.running
    assert status.bootstrap == bootstrap == broker.bootstrap
    assert status.data_dir == home / "data"
    assert (status.data_dir / "meta.properties").is_file()
    assert (home / "broker.pid").read_text().strip() == str(status.pid)
    assert _jvms_using(home) == [status.pid]
    assert os.getpgid(status.pid) == status.pid  # its own group: stop() can signal all of it
    # The broker's log4j2 output lands in the home; the JVM's stdout stays empty.
    assert "Kafka Server started" in (home / "logs" / "server.log").read_text()
    assert not (home / "logs" / "broker.out").read_text().splitlines()[1:]

    topic = "roundtrip"
    payload = f"call-{uuid.uuid4()}".encode()
    assert await _produce(bootstrap, topic, payload) == {0, 1, 2}  # num.partitions=3, auto-created
    assert await _consume(bootstrap, topic, want=1, group_id="roundtrip") == [payload]

    await asyncio.to_thread(broker.stop)
    assert broker.status() is None
    assert not (home / "broker.pid").exists()
    assert not _exists(status.pid)
    assert not _accepts(bootstrap)
    await asyncio.to_thread(broker.stop)  # stopping a stopped broker is a no-op

    # A fresh handle with no port (here the pytest session helper's): the home remembers the
    # port, the cluster and the data.
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    owned = await asyncio.to_thread(session_broker, tmp_path)
    again = owned.require_local()
    assert again.home == home
    assert owned.bootstrap == again.bootstrap == bootstrap
    restarted = again.status()
    assert restarted is not None
    assert restarted.running
    assert restarted.pid != status.pid
    assert await _consume(bootstrap, topic, want=1) == [payload]
    await asyncio.to_thread(owned.stop)
    assert again.status() is None
    assert _jvms_using(home) == []


async def test_crash_pause_and_stale_pid(
    brokers: BrokerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    dead = await asyncio.to_thread(_dead_pid)
    (home / "broker.pid").write_text(f"{dead}\n")  # left by a process that no longer exists
    broker = brokers(home, extra_config={"num.partitions": "2"})
    stale = broker.status()
    assert stale is not None
    assert (stale.pid, stale.running) == (dead, False)
    with pytest.raises(LocalKafkaError, match="no broker is running"):
        broker.pause()
    # A pid recycled by a live, unrelated process (this one) is just as stale.
    (home / "broker.pid").write_text(f"{os.getpid()}\n")
    recycled = broker.status()
    assert recycled is not None
    assert (recycled.pid, recycled.running) == (os.getpid(), False)

    bootstrap = await asyncio.to_thread(broker.start, START_TIMEOUT)
    status = broker.status()
    assert status is not None
    assert status.running
    assert status.pid != dead
    topic = "crashy"
    assert await _produce(bootstrap, topic, b"before-pause") == {0, 1}  # extra_config applied

    # Paused, the process is stopped and cannot answer a metadata request; resumed, it can.
    broker.pause()
    assert _proc_state(status.pid) == "T"
    with pytest.raises(LocalKafkaError, match="did not answer"):
        await asyncio.to_thread(broker.start, 1.5)
    broker.resume()
    assert _proc_state(status.pid) != "T"
    await _produce(bootstrap, topic, b"after-resume")

    # SIGKILL is a crash: the pid file stays behind, stale, and the data dir is not clean.
    broker.kill()
    crashed = broker.status()
    assert crashed is not None
    assert (crashed.pid, crashed.running) == (status.pid, False)
    assert not (home / "data" / ".kafka_cleanshutdown").exists()

    # ensure_broker recovers the home on the same port; a second call adopts, not duplicates.
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    assert await asyncio.to_thread(ensure_broker, home) == bootstrap
    recovered = broker.status()
    assert recovered is not None
    assert recovered.running
    assert recovered.pid != status.pid
    assert await asyncio.to_thread(ensure_broker, home) == bootstrap
    assert _jvms_using(home) == [recovered.pid]
    values = await _consume(bootstrap, topic, want=2)
    assert sorted(values) == [b"after-resume", b"before-pause"]

    # As a context manager a handle adopts the running broker and stops it on the way out.
    with LocalKafka(home) as adopted:
        adopted_status = adopted.status()
        assert adopted_status is not None
        assert adopted_status.pid == recovered.pid
    assert adopted.status() is None
    assert not _exists(recovered.pid)


def test_startup_failures_carry_the_evidence(brokers: BrokerFactory, tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]

        # The remembered/requested client port is checked before anything is spawned.
        with pytest.raises(LocalKafkaError, match=f"port {busy} .* in use"):
            brokers(tmp_path / "a", port=busy).start(START_TIMEOUT)
        assert _jvms_using(tmp_path / "a") == []

        # The controller port is only found busy by the JVM itself: the broker dies during
        # startup and the error quotes its log, and nothing is left running.
        failing = brokers(tmp_path / "b", controller_port=busy)
        with pytest.raises(LocalKafkaError, match="exited during startup") as excinfo:
            failing.start(START_TIMEOUT)
        assert "Address already in use" in str(excinfo.value)
        assert failing.status() is None
        assert _jvms_using(failing.home) == []


def test_session_broker_prefers_an_external_cluster(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka.example:9092")
    assert ensure_broker(tmp_path / "home") == "kafka.example:9092"
    with session_broker(tmp_path) as external:
        assert external.bootstrap == "kafka.example:9092"
        assert external.local is None
        with pytest.raises(pytest.fail.Exception):
            external.require_local()
    assert not (tmp_path / "home").exists()
    assert not (tmp_path / "kafka-home").exists()
