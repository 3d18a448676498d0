"""The soak's memory verdict: each service's heap at the end against its warmed, idle
baseline (resident memory is reported, not judged: the allocator keeps a past peak's pools)."""

from __future__ import annotations

from callstream.soak import Memory


def memory(ingress_end: int, storage_end: int) -> Memory:
    return Memory(
        start={"ingress": 63_000, "storage": 60_000, "driver": 60_000},
        baseline={"ingress": 75_000, "storage": 74_000, "driver": 64_000},
        end={"ingress": 88_000, "storage": 85_000, "driver": 300_000},
        heap_start={"ingress": 200_000, "storage": 180_000},
        heap_baseline={"ingress": 210_000, "storage": 190_000},
        heap_end={"ingress": ingress_end, "storage": storage_end},
    )


def test_a_heap_within_the_tolerance_of_its_baseline_is_back() -> None:
    # Resident memory above the baseline (the allocator's plateau) is not a failure.
    assert memory(220_000, 190_000).not_back() == {}


def test_a_heap_past_the_tolerance_names_the_service() -> None:
    assert memory(240_000, 190_000).not_back() == {"ingress": (210_000, 240_000)}
    assert memory(210_000, 215_000).not_back() == {"storage": (190_000, 215_000)}


def test_a_heap_that_could_not_be_read_is_not_taken_as_back() -> None:
    unread = memory(210_000, 190_000)
    unread.heap_end.pop("storage")
    assert unread.not_back() == {"storage": (190_000, 0)}
