"""The heap gauge follows the objects the process holds, down as well as up."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from core import heap


def blocks(registry: CollectorRegistry) -> float:
    value = registry.get_sample_value(heap.NAME)
    assert value is not None
    return value


def test_the_gauge_rises_with_objects_held_and_falls_when_they_go() -> None:
    registry = CollectorRegistry()
    heap.register(registry)
    before = blocks(registry)
    held = [str(n) + "x" for n in range(200_000)]
    during = blocks(registry)
    del held
    after = blocks(registry)
    assert during - before >= 190_000
    assert during - after >= 190_000
