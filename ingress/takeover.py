"""Draining spool directories that no live process owns.

With CALLSTREAM_INGRESS_WORKERS=N each worker spools to <spool dir>/worker-<i>
(ingress/workers.py). A directory beside a worker's own whose lock is free belongs to nobody
alive: a worker that crashed and is not restarted yet, a worker-<k> with k >= N after a
scale-down, or the spool directory itself as a single process left it (segments directly in
<spool dir>). A single process looks the other way: at the worker-<i> directories under its
own. Whichever process finds such a directory takes its lock, drains it to Kafka in arrival
order (as its own spool drains), and lets go of it once it is empty. It also lets go after a
batch Kafka did not take, and after HOLD_SECONDS (taking it again at its next look), so an
owner restarting meanwhile gets its lock within ingress/publisher.py
OWN_SPOOL_LOCK_WAIT_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from pathlib import Path

from ingress.kafkapublisher import KafkaPublisher
from ingress.publisher import (
    DRAIN_MAX_BYTES,
    DRAIN_MAX_RECORDS,
    DRAIN_STOP_GRACE_SECONDS,
    deliver,
    failure_text,
    spool_at,
)
from ingress.settings import IngressSettings
from ingress.spool import SpoolError, SpoolLocked, finish_or_cancel
from ingress.spoolformat import HEADER_BYTES, segment_ids, segment_name
from ingress.telemetry import SpoolMetrics

log = logging.getLogger(__name__)

WORKER_DIR = re.compile(r"^worker-(\d+)$")
# A crashed worker's reports wait at most this long (plus a batch) for a sibling to look.
SCAN_INTERVAL_SECONDS = 5.0
# A directory is held at most this long (plus the batch under way) before it is let go and
# taken again at the next look: its owner, restarting meanwhile, gets it in the gap.
HOLD_SECONDS = 10.0


def worker_dir(root: Path, index: int) -> Path:
    return root / f"worker-{index}"


def siblings(own: Path) -> list[Path]:
    """The spool directories beside `own` that another process may have left behind."""
    if WORKER_DIR.match(own.name):
        root, found = own.parent, [own.parent]
    else:
        root, found = own, []
    with contextlib.suppress(OSError):
        found += sorted(
            path
            for path in root.iterdir()
            if WORKER_DIR.match(path.name) and path != own and path.is_dir()
        )
    return found


def holds_records(directory: Path) -> bool:
    """A look before taking the lock: segments that hold only their header owe nothing, and
    opening such a directory would only write it a fresh segment."""
    for segment in segment_ids(directory):
        with contextlib.suppress(OSError):
            if (directory / segment_name(segment)).stat().st_size > HEADER_BYTES:
                return True
    return False


class Takeover:
    """Looks beside `own` every few seconds while Kafka takes records, from when it is made
    until `stop`; drains what it finds."""

    def __init__(
        self, own: Path, settings: IngressSettings, kafka: KafkaPublisher, metrics: SpoolMetrics
    ) -> None:
        self._own = own
        self._settings = settings
        self._kafka = kafka
        self._metrics = metrics
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="spool-takeover")

    async def stop(self) -> None:
        self._stopping.set()
        # Cancelled mid-batch: published but not committed is sent again by the next process
        # to take the directory (a duplicate, never a loss).
        await finish_or_cancel(self._task, DRAIN_STOP_GRACE_SECONDS)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._sweep()
            except Exception as exc:
                # Like the drainer, this must outlive any one failure.
                log.error("spool takeover failed; looking again later", exc_info=exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SCAN_INTERVAL_SECONDS):
                    await self._stopping.wait()

    async def _sweep(self) -> None:
        """Drain every free sibling directory that holds records."""
        for directory in await asyncio.to_thread(self._candidates):
            if self._stopping.is_set() or not self._kafka.ready():
                break
            await self._drain(directory)

    def _candidates(self) -> list[Path]:
        return [path for path in siblings(self._own) if holds_records(path)]

    async def _drain(self, directory: Path) -> None:
        spool = spool_at(self._settings, directory, self._metrics)
        try:
            await spool.open()
        except (SpoolError, OSError) as exc:
            self._metrics.forget(spool)
            # SpoolLocked: its owner is alive, or another sibling is on it.
            if not isinstance(exc, SpoolLocked):
                log.error("spool: cannot open %s to drain it (%s)", directory, exc)
            return
        try:
            if spool.depth():
                log.warning(
                    "spool: draining %d record(s) that %s holds for no live process",
                    spool.depth(),
                    directory,
                )
            loop = asyncio.get_running_loop()
            until = loop.time() + HOLD_SECONDS
            while not (spool.empty() or self._stopping.is_set() or loop.time() > until):
                batch = await spool.read(DRAIN_MAX_RECORDS, DRAIN_MAX_BYTES)
                acked, _, error = await deliver(self._kafka, batch)
                if acked:
                    await spool.commit(batch[acked - 1])
                if acked < len(batch):
                    log.warning(
                        "spool: Kafka took %d of %d record(s) from %s (%s); letting it go for now",
                        acked,
                        len(batch),
                        directory,
                        failure_text(error),
                    )
                    break
        finally:
            self._metrics.forget(spool)
            await spool.close()
