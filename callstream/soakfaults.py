"""The soak's processes and the faults it injects into them, one at a time on a schedule
(the kinds: fault_kinds; callstream/soak.py drives the load and keeps the account)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from callstream.bench.procstat import peak_rss_kib, rss_kib
from callstream.localcluster import LocalCluster
from callstream.localkafka import LocalKafka
from callstream.processes import ChildProcess, callstream_argv
from core.kafkasettings import KafkaSettings

# The spool's own small disk: room for minutes of outage at the soak's rates, small enough
# to fill in a moment.
SPOOL_DISK_SIZE = "128m"


def vm_hwm_kib(pid: int | None) -> int:
    """Peak resident set size of a live process, in KiB (0 when it is gone)."""
    return (peak_rss_kib(pid) or 0) if pid is not None else 0


class Service(ChildProcess):
    """One `python -m callstream ...` child, restartable, with a log per incarnation. Remembers
    its peak memory over every incarnation, and exits it did not ask for (which it restarts,
    like a supervisor with Restart=always would, and reports)."""

    def __init__(self, role: str, args: list[str], env: dict[str, str], log_dir: Path, port: int):
        super().__init__(callstream_argv(*args), env=env, name=role)
        self.role, self.log_dir, self.port = role, log_dir, port
        self.incarnation = 0
        self.started_at = 0.0
        self.peak_kib = 0
        self.unexpected_exits: list[int] = []
        self.deliberately_down = False

    def start(self) -> Self:
        self.incarnation += 1
        self.started_at = time.monotonic()
        self.log_file = self.log_dir / f"{self.role}.{self.incarnation}.log"
        self.deliberately_down = False
        return super().start()

    def sample(self) -> None:
        self.peak_kib = max(self.peak_kib, vm_hwm_kib(self.pid if self.running() else None))

    def rss_kib(self) -> int:
        return (rss_kib(self.pid) or 0) if self.running() else 0

    def kill(self) -> int:
        self.sample()
        self.deliberately_down = True
        return super().kill()

    def check(self) -> None:
        if self.deliberately_down or (code := self.poll()) is None:
            return
        self.unexpected_exits.append(code)
        print(f"  !! {self.role} exited by itself ({code}); restarting", flush=True)
        self.start()

    def stop(self, grace: float = 30.0, sig: int = signal.SIGTERM) -> int | None:
        if not self.running():
            return None
        self.sample()
        self.deliberately_down = True
        return super().stop(grace, sig)


class Brokers:
    """The run's own Kafka: one LocalKafka, or a LocalCluster of several nodes (numbered
    from 1). Blocking calls go to a thread so the load never stalls."""

    def __init__(self, home: Path, count: int) -> None:
        self.count = count
        self.cluster = LocalCluster(home, brokers=count) if count > 1 else None
        self.single = LocalKafka(home) if count == 1 else None
        self.peak_kib = 0
        self.incarnation = 0  # node starts, all nodes together
        self.paused: set[int] = set()

    def numbers(self) -> list[int]:
        return list(range(1, self.count + 1))

    def node(self, number: int) -> LocalKafka:
        if self.cluster is not None:
            return self.cluster.node(number)
        assert self.single is not None
        return self.single

    def name(self, number: int) -> str:
        return "broker" if self.count == 1 else f"broker {number}"

    def kafka(self, topic: str) -> KafkaSettings:
        if self.cluster is not None:
            return KafkaSettings(
                bootstrap_servers=self.cluster.bootstrap,
                topic=topic,
                security=self.cluster.security(),
            )
        return KafkaSettings(bootstrap_servers=self.node(1).bootstrap, topic=topic)

    def env(self) -> dict[str, str]:
        if self.cluster is not None:
            return self.cluster.env()
        return {"KAFKA_BOOTSTRAP_SERVERS": self.node(1).bootstrap}

    def pid(self, number: int) -> int | None:
        status = self.node(number).status()
        return status.pid if status is not None and status.running else None

    def sample(self) -> None:
        for number in self.numbers():
            if number not in self.paused:
                self.peak_kib = max(self.peak_kib, vm_hwm_kib(self.pid(number)))

    async def start(self) -> None:
        await asyncio.to_thread((self.cluster or self.node(1)).start)
        self.incarnation += self.count

    async def start_node(self, number: int) -> None:
        await asyncio.to_thread(self.node(number).start)
        self.incarnation += 1

    async def kill(self, number: int) -> None:
        self.sample()
        await asyncio.to_thread(self.node(number).kill, signal.SIGKILL)

    async def stop_node(self, number: int) -> None:
        """SIGTERM, and wait for the broker to exit (a graceful shutdown: it hands its
        partitions' leadership over and closes its logs cleanly)."""
        self.sample()
        await asyncio.to_thread(self.node(number).stop)

    async def pause(self, number: int) -> None:
        self.sample()
        await asyncio.to_thread(self.node(number).pause)
        self.paused.add(number)

    async def resume(self, number: int) -> None:
        await asyncio.to_thread(self.node(number).resume)
        self.paused.discard(number)

    async def leader_of_partition_zero(self, topic: str) -> int | None:
        admin = AIOKafkaAdminClient(**self.kafka(topic).client_kwargs())
        try:
            await admin.start()
            [described] = await admin.describe_topics([topic])
        except KafkaError:
            return None
        finally:
            await admin.close()
        leaders = [int(p["leader"]) for p in described["partitions"] if p["partition"] == 0]
        return leaders[0] if leaders and leaders[0] in self.numbers() else None

    def stop(self) -> None:
        for number in list(self.paused):
            with contextlib.suppress(Exception):
                self.node(number).resume()
        self.sample()
        (self.cluster or self.node(1)).stop()


# -- the spool's disk ---------------------------------------------------------------------


@contextlib.contextmanager
def spool_disk(mount_point: Path) -> Iterator[Path | None]:
    """A tmpfs of its own for the spool (None, and a note, where mounting is not allowed):
    a disk the soak can fill to the last byte without touching anyone else's."""
    mount_point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SPOOL_DISK_SIZE}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        print(f"  note: no tmpfs for the spool ({done.stderr.strip()}); no full-disk faults")
        yield None
        return
    try:
        yield mount_point
    finally:
        # Lazily: a process that is still stopping may hold a segment open.
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill_disk(disk: Path) -> Path:
    """Take every free byte of `disk` with one file; delete it to give them back."""
    filler = disk / "soak-filler"
    with filler.open("wb", buffering=0) as out:
        stat = os.statvfs(disk)
        with contextlib.suppress(OSError):
            os.posix_fallocate(out.fileno(), 0, stat.f_bavail * stat.f_frsize)
        out.seek(0, os.SEEK_END)
        # Whatever the allocation left (a partial block), byte by byte until ENOSPC.
        with contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * 512)
    return filler


# -- faults -------------------------------------------------------------------------------


@dataclass
class Pipeline:
    brokers: Brokers
    ingress: Service
    storage: Service
    topic: str
    started: float
    disk: Path | None = None
    faults: list[str] = field(default_factory=list)
    load_stopped: float = 0.0

    def note(self, text: str) -> None:
        line = f"t+{time.monotonic() - self.started:6.1f}s  {text}"
        self.faults.append(line)
        print("  " + line, flush=True)


async def kill_broker(p: Pipeline, rng: random.Random) -> None:
    await _broker_down(p, rng.choice(p.brokers.numbers()), rng.uniform(10, 30), graceful=False)


async def restart_broker(p: Pipeline, rng: random.Random) -> None:
    await _broker_down(p, rng.choice(p.brokers.numbers()), rng.uniform(10, 30), graceful=True)


async def kill_leader(p: Pipeline, rng: random.Random) -> None:
    number = await p.brokers.leader_of_partition_zero(p.topic)
    if number is None:
        p.note("leader of partition 0 unknown; killing a broker at random")
        number = rng.choice(p.brokers.numbers())
    else:
        p.note(f"broker {number} leads partition 0")
    await _broker_down(p, number, rng.uniform(10, 30), graceful=False)


async def _broker_down(p: Pipeline, number: int, down: float, *, graceful: bool) -> None:
    name = p.brokers.name(number)
    if graceful:
        began = time.monotonic()
        await p.brokers.stop_node(number)
        p.note(f"{name} stopped gracefully in {time.monotonic() - began:.1f} s; down {down:.0f} s")
    else:
        await p.brokers.kill(number)
        p.note(f"{name} SIGKILL; down {down:.0f} s")
    await asyncio.sleep(down)
    began = time.monotonic()
    await p.brokers.start_node(number)
    p.note(f"{name} restarted (ready after {time.monotonic() - began:.1f} s)")


async def pause_broker(p: Pipeline, rng: random.Random) -> None:
    number = rng.choice(p.brokers.numbers())
    frozen = rng.uniform(5, 15)
    await p.brokers.pause(number)
    p.note(f"{p.brokers.name(number)} SIGSTOP; frozen {frozen:.0f} s")
    await asyncio.sleep(frozen)
    await p.brokers.resume(number)
    p.note(f"{p.brokers.name(number)} SIGCONT")


async def kill_storage(p: Pipeline, rng: random.Random) -> None:
    await _kill_and_restart(p, p.storage, "storage consumer", rng.uniform(2, 5))


async def kill_ingress(p: Pipeline, rng: random.Random) -> None:
    await _kill_and_restart(p, p.ingress, "ingress", rng.uniform(1, 3))


async def fill_spool_disk(p: Pipeline, rng: random.Random) -> None:
    """With the spool's disk full and Kafka away, reports that need the spool are refused
    (503: nothing promised); the ingress, restarted then, must still start, and once Kafka
    is back it drains what it had and takes reports again."""
    if p.disk is None:
        return
    filler = await asyncio.to_thread(fill_disk, p.disk)
    p.note("spool disk full")
    for number in p.brokers.numbers():
        await p.brokers.kill(number)
    p.note("kafka SIGKILL (every broker)")
    await asyncio.sleep(rng.uniform(3, 6))
    await _kill_and_restart(p, p.ingress, "ingress (on the full disk)", 1.0)
    await asyncio.sleep(rng.uniform(3, 6))
    await asyncio.gather(*(p.brokers.start_node(n) for n in p.brokers.numbers()))
    p.note("kafka restarted")
    await asyncio.sleep(rng.uniform(3, 6))
    await asyncio.to_thread(filler.unlink)
    p.note("spool disk freed")


async def _kill_and_restart(p: Pipeline, service: Service, label: str, down: float) -> None:
    service.kill()
    p.note(f"{label} SIGKILL; down {down:.1f} s")
    await asyncio.sleep(down)
    service.start()
    p.note(f"{label} restarted")


Fault = Callable[[Pipeline, random.Random], Awaitable[None]]
RESTARTS_A_SERVICE: frozenset[Fault] = frozenset({kill_ingress, kill_storage, fill_spool_disk})


def fault_kinds(p: Pipeline) -> list[Fault]:
    """The first round covers every kind once, the cheap ones first, so even a short run
    sees each; later rounds are shuffled."""
    kinds: list[Fault] = [kill_ingress, pause_broker, kill_storage, kill_broker, restart_broker]
    if p.disk is not None:
        kinds.append(fill_spool_disk)
    if p.brokers.count > 1:
        kinds.append(kill_leader)
    return kinds


async def inject_faults(
    p: Pipeline, seed: int, first_after: float, gap: tuple[float, float], until: float
) -> None:
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    if loop.time() + first_after >= until:
        return  # the load is over before the first fault (the caller awaits this task)
    await asyncio.sleep(first_after)
    kinds = fault_kinds(p)
    schedule = list(kinds)
    # The memory verdict judges the services' last incarnations: none is restarted in the
    # last third, so each has lived through a third of the faults at least.
    no_restarts_after = until - (until - loop.time()) / 3
    while loop.time() < until:
        if not schedule:
            schedule = rng.sample(kinds, len(kinds))
        fault = schedule.pop(0)
        if loop.time() >= no_restarts_after and fault in RESTARTS_A_SERVICE:
            continue
        await fault(p, rng)
        pause = rng.uniform(*gap)
        if loop.time() + pause >= until:
            return
        await asyncio.sleep(pause)
