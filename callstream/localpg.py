"""A real, throwaway PostgreSQL cluster for tests, run from the distribution's binaries.

``PostgresServer(base_dir)`` owns everything under ``base_dir``::

    base_dir/data/          the cluster (initdb on first start; kept across restarts)
    base_dir/socket/        unix socket directory (TCP on 127.0.0.1 is what clients use)
    base_dir/postgres.log   server log, appended across restarts

The binaries come from ``pg_config --bindir`` when that directory really holds a server,
else from the highest version under ``/usr/lib/postgresql/*/bin``. On Debian,
``scripts/install-system-deps`` installs them. A missing server raises
``PostgresNotFoundError``: tests that need PostgreSQL fail, they never skip.

PostgreSQL refuses to run as root, so when the tests run as root the server binaries run
as the ``postgres`` system user (created by Debian's ``postgresql-common``). That user
owns ``data/`` and ``socket/``, and directories above ``base_dir`` it cannot pass through
(pytest's 0700 ``/tmp/pytest-of-root``) get search permission (o+x) added.

Durability is as in production, resource sizes are trimmed (see _server_command). Not
thread-safe: one thread drives a server.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from callstream.lifecycle import StartStop
from callstream.ports import free_port

__all__ = [
    "PostgresNotFoundError",
    "PostgresServer",
    "PostgresServerError",
    "ShutdownMode",
    "find_bindir",
]

ShutdownMode = Literal["smart", "fast", "immediate"]

# The postmaster's documented shutdown signals.
_SHUTDOWN_SIGNALS: dict[ShutdownMode, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}

SUPERUSER = "postgres"
_SERVER_OS_USER = "postgres"
_REQUIRED_BINARIES = ("initdb", "postgres", "psql")
_DEBIAN_ROOT = Path("/usr/lib/postgresql")
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
# Enough to outlast port races and concurrent pytest sessions (see _make_traversable).
_START_ATTEMPTS = 5
# PostgreSQL silently truncates longer identifiers, which would break the returned DSN.
_MAX_IDENTIFIER_BYTES = 63

_INSTALL_HINT = (
    "install the Debian package 'postgresql' (scripts/install-system-deps does it) "
    "or put a PostgreSQL server's pg_config on PATH"
)


class PostgresNotFoundError(RuntimeError):
    """No usable PostgreSQL server installation on this machine."""


class PostgresServerError(RuntimeError):
    """The server could not be initialised, started or stopped."""


def _version_key(bindir: Path) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in bindir.parent.name.split("."))
    except ValueError:
        return ()


@functools.cache
def find_bindir() -> Path:
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        # libpq-dev's pg_config answers even without a server installed (it names
        # the directory the server *would* use), hence the check for the binaries.
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False, timeout=30
        )
        if result.returncode == 0 and result.stdout.strip():
            candidates.append(Path(result.stdout.strip()))
    candidates.extend(sorted(_DEBIAN_ROOT.glob("*/bin"), key=_version_key, reverse=True))
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in _REQUIRED_BINARIES):
            return bindir
    looked = ", ".join(str(c) for c in candidates) or f"{_DEBIAN_ROOT}/*/bin (none exist)"
    raise PostgresNotFoundError(
        f"no PostgreSQL server binaries ({', '.join(_REQUIRED_BINARIES)}) found; "
        f"looked in: {looked}; {_INSTALL_HINT}"
    )


@dataclass(frozen=True)
class _ServerUser:
    """Who the server processes run as; ``None`` fields mean "unchanged"."""

    uid: int | None
    gid: int | None
    groups: tuple[int, ...] | None
    home: str

    @classmethod
    def for_current_process(cls) -> _ServerUser:
        if os.geteuid() != 0:
            return cls(uid=None, gid=None, groups=None, home=os.path.expanduser("~"))
        try:
            entry = pwd.getpwnam(_SERVER_OS_USER)
        except KeyError:
            raise PostgresNotFoundError(
                f"running as root, but there is no '{_SERVER_OS_USER}' system user to run "
                f"the server as (PostgreSQL refuses to run as root); {_INSTALL_HINT}"
            ) from None
        return cls(
            uid=entry.pw_uid,
            gid=entry.pw_gid,
            groups=tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)),
            home=entry.pw_dir,
        )

    @property
    def switches(self) -> bool:
        return self.uid is not None

    def can_search(self, st: os.stat_result) -> bool:
        """Whether this user may traverse a directory, by the kernel's owner/group/other rule."""
        uid = os.geteuid() if self.uid is None else self.uid
        groups = os.getgroups() if self.groups is None else self.groups
        if uid == 0:
            return True
        if st.st_uid == uid:
            return bool(st.st_mode & stat.S_IXUSR)
        if st.st_gid in groups:
            return bool(st.st_mode & stat.S_IXGRP)
        return bool(st.st_mode & stat.S_IXOTH)

    def chown(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)


def _process_cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        # Gone, a zombie (whose cwd is unreadable), or someone else's process.
        return None


def _processes_in(directory: Path) -> list[int]:
    """PIDs of live processes whose working directory is ``directory``.

    Every process of a cluster (postmaster, backends, auxiliary processes) chdirs into
    the data directory, so this finds a killed postmaster's orphans without having had
    to list them before the kill, which would race with fresh backend forks.
    """
    target = str(directory)
    pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [pid for pid in pids if _process_cwd(pid) == target]


# Servers started by this process and not yet stopped. A strong reference on purpose:
# a running server must never be garbage-collected (its Popen would warn, and the
# process would be leaked); the atexit hook below stops whatever is left.
_RUNNING: set[PostgresServer] = set()


@atexit.register
def _stop_leftover_servers() -> None:
    for server in list(_RUNNING):
        with contextlib.suppress(Exception):
            server.stop("fast", timeout=15)
        if server.running:
            with contextlib.suppress(Exception):
                server.kill()


class PostgresServer(StartStop):
    """A PostgreSQL cluster under ``base_dir``, listening on 127.0.0.1 only.

    The port is chosen once (a free one unless given) and kept for restarts, so DSNs
    handed out earlier stay valid. Use as a context manager to start and stop it.
    """

    def __init__(self, base_dir: Path, port: int | None = None) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "socket"
        self.log_path = self.base_dir / "postgres.log"
        # A port given, or one a start has handed out in DSNs, is never chosen again.
        self._port_pinned = port is not None
        self._port = port if port is not None else free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"PostgresServer({str(self.base_dir)!r}, port={self._port}, {state})"

    # -- addresses -------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def dsn(self) -> str:
        """DSN of the ``postgres`` database as the ``postgres`` superuser (trust auth)."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self._port}/{quote(database, safe='')}"

    # -- state -----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start the server (running initdb first if needed); return once it accepts connections.

        ``timeout`` bounds the wait for readiness, which after ``kill()`` includes crash
        recovery.
        """
        if self.running:
            raise PostgresServerError(f"{self!r} is already running")
        self._reap_unexpected_exit()
        bindir = find_bindir()
        user = _ServerUser.for_current_process()
        for attempt in range(1, _START_ATTEMPTS + 1):
            last = attempt == _START_ATTEMPTS
            self._prepare_directories(user)
            try:
                if not (self.data_dir / "PG_VERSION").is_file():
                    self._initdb(bindir, user)
                self._launch(bindir, user, timeout)
                break
            except _PortInUseError:
                # An automatically chosen port can be taken between choosing and
                # binding: choose again, unless it is pinned.
                if last or self._port_pinned:
                    raise
                self._port = free_port()
            except _AccessLostError:
                # See _make_traversable: the next round re-grants search permission.
                if last:
                    raise
        self._port_pinned = True
        _RUNNING.add(self)

    def stop(self, mode: ShutdownMode = "fast", timeout: float = 60.0) -> None:
        """Shut down with ``mode`` (smart: wait for clients, fast: disconnect them,
        immediate: no checkpoint, recovery on next start). A no-op when not running.

        Raises if the postmaster had already died on its own: that is a bug worth
        seeing, not something to tidy away silently.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is not None:
            self._reap_unexpected_exit()
        proc.send_signal(_SHUTDOWN_SIGNALS[mode])
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise PostgresServerError(
                f"{mode} shutdown did not finish within {timeout}s; killed the server. "
                f"Log: {self.log_path}"
            ) from None
        self._proc = None
        _RUNNING.discard(self)
        if proc.returncode != 0:
            raise PostgresServerError(
                f"postmaster exited with status {proc.returncode} on {mode} shutdown; "
                f"log tail:\n{self._log_tail()}"
            )

    def restart(self, mode: ShutdownMode = "fast", timeout: float = 60.0) -> None:
        self.stop(mode, timeout)
        self.start(timeout)

    def kill(self, grace: float = 10.0) -> None:
        """SIGKILL the postmaster, as the OOM killer would.

        Its children notice the postmaster's death and exit by themselves (they must,
        before a new postmaster may attach the shared memory); any still alive after
        ``grace`` seconds are SIGKILLed too. The next ``start()`` runs crash recovery.
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise PostgresServerError(f"{self!r} is not running")
        proc.kill()
        proc.wait()
        self._proc = None
        _RUNNING.discard(self)
        data_dir = self.data_dir.resolve()
        deadline = time.monotonic() + grace
        while (orphans := _processes_in(data_dir)) and time.monotonic() < deadline:
            time.sleep(0.01)
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while _processes_in(data_dir):
            if time.monotonic() > deadline:
                raise PostgresServerError(f"processes of the killed cluster in {data_dir} linger")
            time.sleep(0.01)

    # -- databases -------------------------------------------------------------------

    def create_database(self, name: str) -> str:
        encoded = name.encode()
        if not encoded or b"\0" in encoded or len(encoded) > _MAX_IDENTIFIER_BYTES:
            raise ValueError(
                f"database name must be 1..{_MAX_IDENTIFIER_BYTES} bytes without NUL: {name!r}"
            )
        if not self.running:
            raise PostgresServerError(f"{self!r} is not running")
        identifier = '"' + name.replace('"', '""') + '"'
        self._psql(f"CREATE DATABASE {identifier}")
        return self.dsn_for(name)

    def _psql(self, sql: str) -> None:
        psql = find_bindir() / "psql"
        # Inherited PG* variables (PGSSLMODE, PGSERVICE, PGOPTIONS...) would change how
        # psql connects; -X skips ~/.psqlrc for the same reason.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PGCONNECT_TIMEOUT"] = "10"
        cmd = [
            str(psql), "-X", "-q", "-v", "ON_ERROR_STOP=1",
            "-h", "127.0.0.1", "-p", str(self._port), "-U", SUPERUSER, "-d", "postgres",
            "-c", sql,
        ]  # fmt: skip
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise PostgresServerError(
                f"psql failed ({result.returncode}) running {sql!r}: {result.stderr.strip()}"
            )

    # -- internals -------------------------------------------------------------------

    def _prepare_directories(self, user: _ServerUser) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if user.switches:
            self._make_traversable(user)
        for directory in (self.data_dir, self.socket_dir):
            if not directory.exists():
                # 0700 is what PostgreSQL demands of a data directory.
                directory.mkdir(mode=0o700)
                user.chown(directory)
        socket_path = self.socket_dir / f".s.PGSQL.{self._port}"
        if len(os.fsencode(socket_path)) > _MAX_SOCKET_PATH:
            raise PostgresServerError(
                f"unix socket path {socket_path} is longer than {_MAX_SOCKET_PATH} bytes; "
                "use a shorter base_dir"
            )

    def _make_traversable(self, user: _ServerUser) -> None:
        """Let the server user reach base_dir, adding only o+x where it could not.

        pytest's tmp_path lives under /tmp/pytest-of-root, which is 0700. Search
        permission without read permission lets the server user pass through without
        being able to list anything.

        Every pytest session started as the same user re-tightens that directory to
        0700, so a concurrent session can take the permission away again. A running
        server does not care (it works relative to its data directory once started),
        but initdb and the first moments of a start use absolute paths; they fail with
        "Permission denied" then, and start() grants again and retries.
        """
        for directory in (self.base_dir, *self.base_dir.parents):
            st = directory.stat()
            if not user.can_search(st):
                os.chmod(directory, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)

    def _as_server(self, user: _ServerUser) -> dict[str, Any]:
        """subprocess arguments that run a server binary as `user`, in base_dir."""
        return {
            "env": {"PATH": os.environ.get("PATH", os.defpath), "HOME": user.home, "LC_ALL": "C"},
            "cwd": self.base_dir,
            "user": user.uid,
            "group": user.gid,
            "extra_groups": user.groups,
            "stdin": subprocess.DEVNULL,
        }

    def _initdb(self, bindir: Path, user: _ServerUser) -> None:
        cmd = [
            str(bindir / "initdb"),
            "--pgdata", str(self.data_dir),
            "--username", SUPERUSER,
            # trust for local and loopback only: initdb's pg_hba.conf has no other lines.
            "--auth", "trust",
            "--encoding", "UTF8",
            # The C locale makes sorting identical on every machine and needs no
            # generated locales on minimal CI images.
            "--locale", "C",
            "--no-instructions",
        ]  # fmt: skip
        result = subprocess.run(
            cmd, **self._as_server(user), capture_output=True, text=True, timeout=300, check=False
        )
        if result.returncode != 0:
            output = result.stdout + result.stderr
            if user.switches and "Permission denied" in output:
                # initdb cannot clean up after itself once it has lost access.
                shutil.rmtree(self.data_dir)
                raise _AccessLostError(f"initdb lost access to {self.data_dir}:\n{output}")
            raise PostgresServerError(
                f"initdb failed ({result.returncode}) for {self.data_dir}:\n{output}"
            )

    def _server_command(self, bindir: Path) -> list[str]:
        # Command-line settings outrank postgresql.conf and postgresql.auto.conf, so the
        # server always comes up with exactly these, whatever a test did with ALTER SYSTEM.
        settings = {
            "port": str(self._port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.socket_dir),
            # Durability stays as in production: the crash tests depend on it.
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            # Sizes only: many clusters may run side by side in one CI job.
            "shared_buffers": "32MB",
            "max_connections": "100",
            "logging_collector": "off",
            "log_destination": "stderr",
        }
        cmd = [str(bindir / "postgres"), "-D", str(self.data_dir)]
        for name, value in settings.items():
            cmd += ["-c", f"{name}={value}"]
        return cmd

    def _launch(self, bindir: Path, user: _ServerUser, timeout: float) -> None:
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        # Popen's user/group switch (what runuser does, minus PAM) rather than runuser
        # itself: runuser stays in between as the parent, and then the PID held here
        # would not be the postmaster's and kill() would SIGKILL the wrong process.
        # The server keeps pytest's process group, so a ^C reaches it as a fast
        # shutdown instead of leaving it behind.
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                self._server_command(bindir),
                **self._as_server(user),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._proc = proc
        deadline = time.monotonic() + timeout
        while self._pidfile_status(proc.pid) != "ready":
            if proc.poll() is not None:
                self._proc = None
                output = self._log_since(log_offset)
                if "Address already in use" in output:
                    raise _PortInUseError(
                        f"port {self._port} on 127.0.0.1 is already in use; log:\n{output}"
                    )
                if user.switches and "Permission denied" in output:
                    raise _AccessLostError(
                        f"postgres could not reach {self.base_dir}; log:\n{output}"
                    )
                raise PostgresServerError(
                    f"postgres exited with status {proc.returncode} while starting; log:\n{output}"
                )
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                self._proc = None
                raise PostgresServerError(
                    f"postgres did not become ready within {timeout}s; "
                    f"log:\n{self._log_since(log_offset)}"
                )
            time.sleep(0.01)

    def _pidfile_status(self, pid: int) -> str | None:
        """The postmaster's own report of its state, the same signal ``pg_ctl -w`` uses.

        Line 8 of postmaster.pid becomes "ready" only once startup (including crash
        recovery) is done and connections are accepted; line 1 must be this postmaster's
        PID, or the file is a stale one left by a killed predecessor.
        """
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        if len(lines) < 8 or lines[0].strip() != str(pid):
            return None
        return lines[7].strip()

    def _reap_unexpected_exit(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        _RUNNING.discard(self)
        raise PostgresServerError(
            f"postmaster (pid {proc.pid}) had exited on its own with status "
            f"{proc.returncode}; log tail:\n{self._log_tail()}"
        )

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, lines: int = 30) -> str:
        return "\n".join(self._log_since(0).splitlines()[-lines:])

    def log_text(self) -> str:
        """The server log so far, for tests that assert on what the server reported."""
        return self._log_since(0)


class _PortInUseError(PostgresServerError):
    pass


class _AccessLostError(PostgresServerError):
    pass
