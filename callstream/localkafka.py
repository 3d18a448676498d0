"""A real single-node Apache Kafka broker (KRaft, combined broker+controller) as a child JVM.

`callstream run`, the test suite and `callstream kafka start` need a broker but must not need
Docker or a hand-installed Kafka. The broker jars come from Maven Central and are cached per
Kafka version (callstream.kafkajars); everything a broker instance owns (config, data, logs, pid
file, chosen ports, cluster id) lives in one "home" directory, so a home can be stopped,
restarted and inspected by any process, not only by the one that started it.

Layout of a home::

    broker.json          ports and cluster id, so a restart keeps the same bootstrap address
    broker.pid           pid of the running JVM (also its process-group id)
    server.properties    regenerated on every start from defaults + extra_config
    log4j2.properties    regenerated on every start
    data/                log.dirs and the KRaft metadata log
    logs/server.log      the broker's own log4j2 output
    logs/broker.out      JVM stdout/stderr (crashes, hs_err notices)
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from callstream.commandsettings import LocalBrokerSettings
from callstream.kafkajars import (
    KAFKA_VERSION,
    LocalKafkaError,
    ensure_kafka_jars,
    find_java,
    flocked,
    jar_cache_dir,
    run_tool,
    tail_text,
)
from callstream.kafkaprobe import broker_ready, free_port, port_free
from callstream.lifecycle import StartStop
from core.kafkasettings import BOOTSTRAP

__all__ = [
    "KAFKA_VERSION",
    "BrokerStatus",
    "LocalKafka",
    "LocalKafkaError",
    "default_home",
    "ensure_broker",
    "ensure_kafka_jars",
    "jar_cache_dir",
]

_HOST = "127.0.0.1"
_FORMAT_TIMEOUT_S = 120.0
_HAS_PROC = Path("/proc/self/stat").exists()


class _DetachedPopen(subprocess.Popen[bytes]):
    """A Popen that may be dropped while its child runs, because that is the point.

    The broker is meant to outlive this handle and the process that started it; the pid file
    is the real handle. Plain Popen warns "subprocess N is still running" when collected (an
    error under pytest's filterwarnings=error, noise at CLI exit), and while this process is
    still the parent, _alive() reaps the exited JVM with waitpid instead.
    """

    def __del__(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class BrokerStatus:
    pid: int
    bootstrap: str | None
    running: bool
    data_dir: Path


def default_home() -> Path:
    return LocalBrokerSettings.from_env(os.environ).home or Path.cwd() / ".callstream"


class LocalKafka(StartStop):
    """One broker home. Instances are cheap handles: all state lives on disk in `home`.

    A node of a cluster (callstream.localcluster) is one of these with its own `node_id`,
    the cluster's listeners in `extra_config`, and `format_args` for its SCRAM users; `port`
    is then its plaintext inter-broker listener, which the readiness probe asks.
    """

    def __init__(
        self,
        home: Path,
        port: int | None = None,
        controller_port: int | None = None,
        version: str = KAFKA_VERSION,
        extra_config: Mapping[str, str] | None = None,
        *,
        node_id: int = 1,
        format_args: Sequence[str] = (),
    ) -> None:
        self.home = Path(home).absolute()
        self.data_dir = self.home / "data"
        self.log_dir = self.home / "logs"
        self.pid_file = self.home / "broker.pid"
        self.state_file = self.home / "broker.json"
        self.config_file = self.home / "server.properties"
        self.log_file = self.log_dir / "server.log"
        self.version = version
        self.node_id = node_id
        self._port = port
        self._controller_port = controller_port
        self._extra_config = dict(extra_config or {})
        self._format_args = tuple(format_args)

    @property
    def bootstrap(self) -> str:
        port = self._port or self._load_state().get("port")
        if not isinstance(port, int):
            raise LocalKafkaError(f"no broker port chosen yet for {self.home}; call start() first")
        return f"{_HOST}:{port}"

    def __repr__(self) -> str:
        return f"LocalKafka(home={str(self.home)!r})"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> str:
        """Start the broker (or adopt the one already running in this home); return bootstrap.

        Returns only once the broker answers a Metadata request listing itself, so callers can
        produce immediately.
        """
        deadline = time.monotonic() + timeout
        # Serialises concurrent `callstream run` / test processes sharing a home: the loser
        # waits and then adopts the winner's broker instead of formatting or binding twice.
        with flocked(self.home / ".lock"):
            pid = self._running_pid()
            if pid is not None:
                return self._adopt(pid, deadline)
            self.pid_file.unlink(missing_ok=True)
            libs = ensure_kafka_jars(self.version)
            java = find_java()
            state = self._prepare_state()
            self._write_config(state)
            self._write_log4j_config()
            if not (self.data_dir / "meta.properties").is_file():
                self._format_storage(java, libs, state["cluster_id"])
            return self._spawn(java, libs, state, deadline)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the broker's process group, escalate to SIGKILL after `timeout`."""
        with flocked(self.home / ".lock"):
            pid = self._running_pid()
            if pid is not None:
                _terminate(pid, timeout)
            self.pid_file.unlink(missing_ok=True)

    def status(self) -> BrokerStatus | None:
        """None when no pid file exists; a stale pid file reports running=False."""
        pid = _read_pid(self.pid_file)
        if pid is None:
            return None
        port = self._load_state().get("port")
        return BrokerStatus(
            pid=pid,
            bootstrap=f"{_HOST}:{port}" if isinstance(port, int) else None,
            running=self._is_our_broker(pid),
            data_dir=self.data_dir,
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the broker JVM directly, e.g. to simulate a crash.

        The pid file is deliberately left behind after SIGKILL, exactly like a real crash, so
        the next start() exercises stale-pid and log-recovery handling.
        """
        pid = self._require_pid()
        os.kill(pid, sig)
        if sig == signal.SIGKILL:
            _wait_gone(pid, 10.0)

    def pause(self) -> None:
        """SIGSTOP the broker: sockets stay open but nothing answers (a hung broker).

        Returns once the kernel reports the process stopped; group-stop reaches a JVM's many
        threads asynchronously, and a fault-injection test must not race it.
        """
        pid = self._require_pid()
        os.kill(pid, signal.SIGSTOP)
        _wait_stopped(pid, stopped=True)

    def resume(self) -> None:
        pid = self._require_pid()
        os.kill(pid, signal.SIGCONT)
        _wait_stopped(pid, stopped=False)

    # -- internals -------------------------------------------------------------------------

    def _require_pid(self) -> int:
        pid = self._running_pid()
        if pid is None:
            raise LocalKafkaError(f"no broker is running in {self.home}")
        return pid

    def _running_pid(self) -> int | None:
        pid = _read_pid(self.pid_file)
        if pid is not None and self._is_our_broker(pid):
            return pid
        return None

    def _is_our_broker(self, pid: int) -> bool:
        if not _alive(pid):
            return False
        # After a reboot or a long gap the pid may belong to an unrelated process; only trust
        # it if it is a Kafka JVM reading this home's config.
        if not _HAS_PROC:
            return True  # macOS: liveness is all we can check
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False  # exited since the liveness check
        return b"kafka.Kafka" in cmdline and str(self.config_file).encode() in cmdline

    def _adopt(self, pid: int, deadline: float) -> str:
        state = self._load_state()
        port = state.get("port")
        if not isinstance(port, int):
            raise LocalKafkaError(f"broker pid {pid} is running but {self.state_file} is missing")
        if self._port is not None and self._port != port:
            raise LocalKafkaError(
                f"the broker in {self.home} is already running on port {port}, not {self._port}"
            )
        cluster_id = state.get("cluster_id") or _read_meta_cluster_id(self.data_dir) or ""
        self._wait_ready(pid, port, str(cluster_id), deadline, log_offset=(0, 0))
        return f"{_HOST}:{port}"

    def _load_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _prepare_state(self) -> dict[str, Any]:
        state = self._load_state()
        port = self._port or state.get("port")
        if isinstance(port, int):
            # Clients and config files remember the bootstrap address, so silently moving the
            # broker to another port would be worse than failing loudly.
            if not port_free(port):
                raise LocalKafkaError(
                    f"port {port} for the broker in {self.home} is in use by another process; "
                    f"free it, or pass another port (remembered in {self.state_file})"
                )
        else:
            port = free_port()
        controller_port = self._controller_port or state.get("controller_port")
        if not isinstance(controller_port, int) or (
            self._controller_port is None and not port_free(controller_port)
        ):
            # With a static controller.quorum.voters the controller address is not stored in the
            # metadata log, so it can move freely; nobody outside the JVM connects to it.
            controller_port = free_port(avoid=port)
        cluster_id = state.get("cluster_id") or _read_meta_cluster_id(self.data_dir)
        if not isinstance(cluster_id, str) or not cluster_id:
            cluster_id = new_cluster_id()
        state.update(
            port=port,
            controller_port=controller_port,
            cluster_id=cluster_id,
            node_id=self.node_id,
            kafka_version=self.version,
        )
        atomic_write(self.state_file, json.dumps(state, indent=2, sort_keys=True) + "\n")
        return state

    def _write_config(self, state: Mapping[str, Any]) -> None:
        port, cport = state["port"], state["controller_port"]
        config = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            # Static voters rather than `--standalone` + controller.quorum.bootstrap.servers:
            # a dynamic quorum bakes the controller endpoint into the formatted log, which would
            # pin the controller port forever.
            "controller.quorum.voters": f"{self.node_id}@{_HOST}:{cport}",
            "controller.listener.names": "CONTROLLER",
            "listeners": f"PLAINTEXT://{_HOST}:{port},CONTROLLER://{_HOST}:{cport}",
            "advertised.listeners": f"PLAINTEXT://{_HOST}:{port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "3",
            "default.replication.factor": "1",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "min.insync.replicas": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            # After a crash the restarted controller still holds the dead incarnation's
            # registration and answers DUPLICATE_BROKER_REGISTRATION until that session times
            # out: the default 9 s would be added to every post-crash start. The cost is that a
            # broker paused for longer than this is briefly fenced when it resumes.
            "broker.session.timeout.ms": "4000",
            "broker.heartbeat.interval.ms": "500",
        }
        config.update(self._extra_config)
        lines = [f"# generated by callstream.localkafka at {_now()}; edits are overwritten"]
        for key, value in config.items():
            if "\n" in value or "\r" in value:
                raise LocalKafkaError(f"config value for {key!r} must be a single line")
            lines.append(f"{key}={_escape_property(value)}")
        atomic_write(self.config_file, "\n".join(lines) + "\n")

    def _write_log4j_config(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_file
        text = f"""\
# generated by callstream.localkafka; edits are overwritten
status = warn
name = callstream-localkafka
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.filePattern = {log}.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 4
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
# one line per request at INFO would drown everything else
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.request.additivity = false
logger.request.appenderRef.file.ref = FILE
"""
        atomic_write(self.home / "log4j2.properties", text)

    def _jvm_args(self, java: str, libs: Path) -> list[str]:
        heap = LocalBrokerSettings.from_env(os.environ).heap_opts
        return [
            java,
            *shlex.split(heap),
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            # log4j2's own shutdown hook races Kafka's and stops logging half-way through a
            # graceful shutdown; the file appender flushes per line, so nothing is lost without it.
            "-Dlog4j2.shutdownHookEnabled=false",
            f"-Dkafka.logs.dir={self.log_dir}",
            "-cp",
            f"{libs}/*",
        ]

    def _format_storage(self, java: str, libs: Path, cluster_id: str) -> None:
        cmd = [
            *self._jvm_args(java, libs),
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            cluster_id,
            "--config",
            str(self.config_file),
            # A crash between writing bootstrap.checkpoint and meta.properties must not wedge
            # the home; re-formatting an already formatted dir is then a no-op.
            "--ignore-formatted",
            *self._format_args,
        ]
        what = f"kafka-storage format in {self.home}"
        run_tool(cmd, what=what, timeout=_FORMAT_TIMEOUT_S, cwd=self.home)

    def _spawn(self, java: str, libs: Path, state: Mapping[str, Any], deadline: float) -> str:
        port = int(state["port"])
        out_path = self.log_dir / "broker.out"
        log_offset = _file_size(self.log_file)
        with out_path.open("ab") as out:
            out.write(f"--- {_now()} starting Kafka {self.version} on port {port}\n".encode())
            out.flush()
            out_offset = out.tell()
            # start_new_session: the JVM gets its own session and process group, so Ctrl-C in
            # the terminal that ran `callstream kafka start` does not reach it, it outlives that
            # CLI, and stop() can signal the whole group.
            proc = _DetachedPopen(
                [*self._jvm_args(java, libs), "kafka.Kafka", str(self.config_file)],
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        atomic_write(self.pid_file, f"{proc.pid}\n")
        try:
            self._wait_ready(
                proc.pid,
                port,
                str(state["cluster_id"]),
                deadline,
                log_offset=(log_offset, out_offset),
            )
        except BaseException:
            # A half-started broker left behind would hold the port and the data-dir lock.
            with contextlib.suppress(LocalKafkaError):
                _terminate(proc.pid, 10.0)
            self.pid_file.unlink(missing_ok=True)
            raise
        return f"{_HOST}:{port}"

    def _wait_ready(
        self, pid: int, port: int, cluster_id: str, deadline: float, log_offset: tuple[int, int]
    ) -> None:
        while True:
            if not _alive(pid):
                raise LocalKafkaError(
                    f"Kafka broker (pid {pid}) exited during startup\n{self._log_tail(log_offset)}"
                )
            if broker_ready(port, cluster_id, self.node_id, timeout=1.0):
                return
            if time.monotonic() >= deadline:
                raise LocalKafkaError(
                    f"Kafka broker (pid {pid}) did not answer on {_HOST}:{port} in time\n"
                    f"{self._log_tail(log_offset)}"
                )
            time.sleep(0.1)

    def _log_tail(self, offsets: tuple[int, int]) -> str:
        # Only what this start wrote: the files append across runs and an old run's error
        # would be a convincing red herring.
        server_off, out_off = offsets
        parts = []
        server_log = _read_from(self.log_file, server_off)
        errors = _logged_errors(server_log)
        if errors:
            parts.append(f"--- errors in {self.log_file}:\n{errors}")
        if server_log.strip():
            parts.append(f"--- tail of {self.log_file}:\n{tail_text(server_log, 30)}")
        out = _read_from(self.log_dir / "broker.out", out_off)
        if out.strip():
            parts.append(f"--- JVM output ({self.log_dir / 'broker.out'}):\n{tail_text(out, 20)}")
        return "\n".join(parts) or f"(no broker output in {self.log_dir})"


def ensure_broker(home: Path | None = None) -> str:
    """Bootstrap servers for `callstream run`: KAFKA_BOOTSTRAP_SERVERS, else a local broker.

    The local broker is started (or the one already running in `home` adopted) and left running
    after this process exits; `callstream kafka stop` ends it.
    """
    if BOOTSTRAP.is_set(os.environ):
        return str(BOOTSTRAP.read(os.environ, str))
    return LocalKafka(home if home is not None else default_home()).start()


# -- process helpers -------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    # If we are the parent (we started it, it has not been reparented), an exited broker stays
    # a zombie that kill(pid, 0) still reaches until someone reaps it: reap it here.
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # someone else's child, e.g. started by an earlier `callstream kafka start`
    else:
        return reaped == 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A dead broker whose (other) parent has not reaped it yet must not count as running.
    return _proc_state(pid) != "Z"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may itself contain spaces or parentheses.
    fields = stat.rpartition(")")[2].split()
    return fields[0] if fields else None


def _wait_stopped(pid: int, stopped: bool, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state = _proc_state(pid)
        if state is None or (state == "T") == stopped:
            return  # no /proc to ask (macOS), or already there
        if time.monotonic() >= deadline:
            raise LocalKafkaError(f"broker pid {pid} did not {'stop' if stopped else 'continue'}")
        time.sleep(0.01)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    except PermissionError:
        # Not a group leader we may signal (pid file written by something else): fall back.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _terminate(pid: int, timeout: float) -> None:
    _signal_group(pid, signal.SIGTERM)
    # A paused (SIGSTOPped) broker would hold the SIGTERM pending forever.
    _signal_group(pid, signal.SIGCONT)
    if _wait_gone(pid, timeout):
        return
    _signal_group(pid, signal.SIGKILL)
    if not _wait_gone(pid, 10.0):
        raise LocalKafkaError(f"Kafka broker pid {pid} survived SIGKILL")


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


# -- file helpers ----------------------------------------------------------------------------


def new_cluster_id() -> str:
    # Same shape as Kafka's Uuid.randomUuid().toString(): url-safe base64 without padding; a
    # leading '-' is avoided because the storage tool's argument parser would read it as a flag.
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _read_meta_cluster_id(data_dir: Path) -> str | None:
    # broker.json lost but the data survived: reuse the formatted id, or the broker refuses
    # to start ("Invalid cluster.id").
    try:
        text = (data_dir / "meta.properties").read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "cluster.id":
            return value.strip()
    return None


def _escape_property(value: str) -> str:
    # java.util.Properties treats backslash as an escape; paths and regexes must survive.
    return value.replace("\\", "\\\\")


def atomic_write(path: Path, text: str) -> None:
    # Owner-only from the first byte: cluster.json and a SASL node's server.properties hold
    # the SCRAM password, and only this user's processes read any of these files.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(text)
    tmp.replace(path)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            # A rollover since `offset` shrank the file; then all of it is new.
            start = offset if offset <= size else 0
            fh.seek(max(start, size - 256 * 1024))
            return fh.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _logged_errors(text: str, limit: int = 20) -> str:
    """ERROR/FATAL records and their "Caused by" chain, without the stack frames.

    The root cause is usually the first error, and the plain tail is then buried under the
    hundreds of lines a dying broker logs while shutting its components down.
    """
    picked: list[str] = []
    in_error = False
    for line in text.splitlines():
        if line.startswith("["):
            in_error = "] ERROR " in line or "] FATAL " in line
            if in_error:
                picked.append(line)
        elif in_error and line.startswith("Caused by:"):
            picked.append(f"    {line}")
    return "\n".join(picked[:limit])


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
