"""Every consumer callstream runs: the built-in ones below, and those other installed
packages register under the `callstream.consumers` entry point group.

A package registers a consumer with no edit here, in its own pyproject.toml:

    [project.entry-points."callstream.consumers"]
    crm-forward = "crm_forward:SPEC"

where `crm_forward.SPEC` is a `consumers.contract.ConsumerSpec`. The entry point's name is
the consumer's one name (CLI argument, consumer group, metric label), so it may not be the
name of a built-in consumer or of another package's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from consumers import alerting, metrics, storage
from consumers.contract import ConsumerSpec
from consumers.errors import ConsumerRegistryError

ENTRY_POINT_GROUP = "callstream.consumers"
# One name everywhere: it becomes a group id, a metric label and part of a variable's name.
_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
BUILT_IN = "built-in"

#: The consumers shipped with callstream: the ones compose runs and .env.example lists.
CONSUMERS: dict[str, ConsumerSpec] = {
    "storage": ConsumerSpec(
        storage.build, 9101, "one row per call in SQLite or PostgreSQL", storage.StorageSettings
    ),
    "alerting": ConsumerSpec(
        alerting.build, 9102, "notifications from YAML rules", alerting.AlertingSettings
    ),
    "metrics": ConsumerSpec(
        metrics.build, 9103, "business metrics, counted once per call", metrics.MetricsSettings
    ),
}


@dataclass(frozen=True, slots=True)
class Registered:
    spec: ConsumerSpec
    #: "built-in", or the distribution that registered it with its version ("pkg 1.2.0")
    origin: str


def registered() -> dict[str, Registered]:
    """The built-in consumers, then those of installed packages, by name.

    Raises ConsumerRegistryError when a package's name clashes with a built-in or with
    another package's (running two consumers under one name would mix their groups, offsets
    and metrics), is not a name that can become a variable and a group, or its entry point
    is not a ConsumerSpec.
    """
    points = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name)
    # Every name is checked before anything is imported: a clash is the problem to report,
    # even when one of the two packages would not import.
    origins = {name: BUILT_IN for name in CONSUMERS}
    for point in points:
        origin = _origin(point)
        taken = origins.get(point.name)
        if taken is not None:
            raise ConsumerRegistryError(
                f"consumer name {point.name!r} of {origin} clashes with the"
                f" {taken} consumer {point.name!r}; rename the entry point in"
                f' [project.entry-points."{ENTRY_POINT_GROUP}"]'
            )
        if not _NAME.fullmatch(point.name):
            raise ConsumerRegistryError(
                f"consumer name {point.name!r} of {origin} is not lower-case letters, digits"
                " and dashes; it names a consumer group and CALLSTREAM_<NAME>_PORT"
            )
        origins[point.name] = origin
    out = {name: Registered(spec, BUILT_IN) for name, spec in CONSUMERS.items()}
    for point in points:
        origin = origins[point.name]
        try:
            spec = point.load()
        except Exception as exc:
            raise ConsumerRegistryError(
                f"consumer {point.name!r} of {origin} cannot be loaded ({point.value}): {exc}"
            ) from exc
        if not isinstance(spec, ConsumerSpec):
            raise ConsumerRegistryError(
                f"consumer {point.name!r} of {origin}: {point.value} is of type"
                f" {type(spec).__name__}, not a consumers.contract.ConsumerSpec"
            )
        out[point.name] = Registered(spec, origin)
    return out


def lookup(name: str) -> Registered:
    """One consumer by name; ConsumerRegistryError naming the known ones otherwise."""
    known = registered()
    found = known.get(name)
    if found is None:
        raise ConsumerRegistryError(
            f"no consumer named {name!r}; registered: {', '.join(sorted(known))}"
        )
    return found


def _origin(point: EntryPoint) -> str:
    dist = point.dist
    if dist is None:
        return f"entry point {point.value}"
    return f"{dist.name} {dist.version}"
