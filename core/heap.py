"""The Python heap as a gauge: how many objects the process holds, next to how much memory it
has from the system.

Resident memory does not come back down after a peak: CPython hands an arena (1 MiB of small
objects) back to the system only once every object in it is gone, so a process that once
held many objects keeps pools a few survivors pin. The number of allocated blocks does come
back; a leak shows there, not in the resident memory's plateau.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

NAME = "callstream_python_heap_blocks"


class PythonHeap(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            NAME,
            "Blocks (objects and buffers) allocated on the Python heap now",
            value=sys.getallocatedblocks(),
        )


def register(registry: CollectorRegistry) -> None:
    registry.register(PythonHeap())
