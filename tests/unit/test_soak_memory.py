"""The soak's memory verdict: each service's end against its warmed, idle baseline."""

from __future__ import annotations

from callstream.soak import Memory

MIB = 1024


def memory(ingress_end: int, storage_end: int) -> Memory:
    return Memory(
        start={"ingress": 62 * MIB, "storage": 60 * MIB, "driver": 60 * MIB},
        baseline={"ingress": 80 * MIB, "storage": 78 * MIB, "driver": 70 * MIB},
        end={"ingress": ingress_end, "storage": storage_end, "driver": 300 * MIB},
    )


def test_an_end_within_the_tolerance_of_the_baseline_is_back() -> None:
    # Above the cold start, at the warmed baseline: what load alone leaves, not the faults.
    assert memory(86 * MIB, 78 * MIB).not_back() == {}


def test_an_end_past_the_tolerance_names_the_service() -> None:
    assert memory(89 * MIB, 78 * MIB).not_back() == {"ingress": (80 * MIB, 89 * MIB)}
    assert memory(80 * MIB, 90 * MIB).not_back() == {"storage": (78 * MIB, 90 * MIB)}


def test_the_driver_is_not_judged() -> None:
    # It keeps every call id it sent for the account, so it only grows.
    assert "driver" not in memory(80 * MIB, 78 * MIB).not_back()
