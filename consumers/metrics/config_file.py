"""The metrics config file (CALLSTREAM_METRICS_CONFIG): more structured_data fields to
measure, each validated so its metric cannot collide with another's samples."""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from core.settings import SettingsError

FieldKind = Literal["numeric", "boolean"]

CUSTOM_PREFIX = "callstream_call_field_"

# The Prometheus metric-name charset without the colon, which is reserved for recording rules.
_NAME = re.compile(r"^[a-zA-Z0-9_]+$")
# Names that would make a histogram or counter expose samples indistinguishable from another
# metric's (`x_bucket` next to `x`'s own buckets), or read as a unit-less counter.
_RESERVED_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created", "_info")
MAX_NAME_LENGTH = 100
MAX_BUCKETS = 40  # each bucket is one time series per histogram
_FIELD_KEYS = frozenset({"key", "name", "type", "buckets", "help"})


class MetricsConfigError(SettingsError):
    """The metrics config file (or an allow-list entry) cannot be used as written."""


@dataclass(frozen=True, slots=True)
class FieldMetric:
    """One structured_data field measured on top of the built-ins."""

    key: str  # top-level key in structured_data
    name: str  # the metric is callstream_call_field_<name>
    kind: FieldKind
    buckets: tuple[float, ...]  # numeric only; +Inf is implicit
    help: str

    @property
    def metric_name(self) -> str:
        suffix = "_true_total" if self.kind == "boolean" else ""
        return f"{CUSTOM_PREFIX}{self.name}{suffix}"


def load_fields(path: Path, builtin_keys: set[str]) -> tuple[FieldMetric, ...]:
    """Read and validate the field list; every problem names the file and the entry."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MetricsConfigError(f"CALLSTREAM_METRICS_CONFIG={path}: {exc.strerror}") from exc
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MetricsConfigError(f"{path}: not valid YAML: {exc}") from exc
    source = str(path)
    if document is None:
        return ()
    if not isinstance(document, dict):
        raise MetricsConfigError(f"{source}: the top level must be a mapping with `fields:`")
    unknown = set(document) - {"fields"}
    if unknown:
        raise MetricsConfigError(f"{source}: unknown top-level keys {sorted(map(str, unknown))}")
    entries = document.get("fields") or []
    if not isinstance(entries, list):
        raise MetricsConfigError(f"{source}: `fields` must be a list")
    fields = tuple(
        _parse_field(entry, f"{source}: fields[{index}]") for index, entry in enumerate(entries)
    )
    _check_unique(fields, builtin_keys, source)
    return fields


def _parse_field(entry: Any, where: str) -> FieldMetric:
    if not isinstance(entry, dict):
        raise MetricsConfigError(f"{where}: must be a mapping with `key` and `type`")
    unknown = set(entry) - _FIELD_KEYS
    if unknown:
        raise MetricsConfigError(f"{where}: unknown keys {sorted(map(str, unknown))}")
    key = entry.get("key")
    if not isinstance(key, str) or not key:
        raise MetricsConfigError(f"{where}: `key` (the structured_data key) is required")
    name = entry.get("name", key)
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > MAX_NAME_LENGTH:
        raise MetricsConfigError(
            f"{where}: metric name {name!r} must be 1..{MAX_NAME_LENGTH} of [a-zA-Z0-9_]"
            + ("" if "name" in entry else "; give the field a `name`")
        )
    if name.endswith(_RESERVED_SUFFIXES):
        raise MetricsConfigError(
            f"{where}: metric name {name!r} must not end in any of {list(_RESERVED_SUFFIXES)}"
        )
    kind = entry.get("type")
    if kind not in ("numeric", "boolean"):
        raise MetricsConfigError(f"{where}: `type` must be numeric or boolean, not {kind!r}")
    help_text = entry.get("help", f"structured_data.{key} of each counted call.")
    if not isinstance(help_text, str) or not help_text.strip():
        raise MetricsConfigError(f"{where}: `help` must be a non-empty string")
    if kind == "boolean":
        if "buckets" in entry:
            raise MetricsConfigError(f"{where}: a boolean field has no buckets")
        return FieldMetric(key, name, "boolean", (), help_text)
    return FieldMetric(key, name, "numeric", _buckets(entry.get("buckets"), where), help_text)


def _buckets(raw: Any, where: str) -> tuple[float, ...]:
    if not isinstance(raw, list) or not raw:
        raise MetricsConfigError(f"{where}: a numeric field needs a non-empty `buckets` list")
    if len(raw) > MAX_BUCKETS:
        raise MetricsConfigError(f"{where}: at most {MAX_BUCKETS} buckets")
    # YAML reads `true` as a bool, and bool is an int in Python: refuse it explicitly.
    if any(isinstance(b, bool) or not isinstance(b, int | float) for b in raw):
        raise MetricsConfigError(f"{where}: buckets must be numbers")
    buckets = tuple(float(b) for b in raw)
    if not all(math.isfinite(b) for b in buckets):
        raise MetricsConfigError(f"{where}: buckets must be finite (+Inf is always added)")
    if any(a >= b for a, b in itertools.pairwise(buckets)):
        raise MetricsConfigError(f"{where}: buckets must be strictly increasing")
    return buckets


def _check_unique(fields: tuple[FieldMetric, ...], builtin_keys: set[str], source: str) -> None:
    seen_keys: set[str] = set()
    seen_field_names: set[str] = set()
    seen_names: dict[str, str] = {}
    for field in fields:
        if field.key in builtin_keys:
            raise MetricsConfigError(
                f"{source}: structured_data key {field.key!r} is already measured by a built-in "
                "metric (see the CALLSTREAM_METRICS_*_KEY settings)"
            )
        if field.key in seen_keys:
            raise MetricsConfigError(f"{source}: structured_data key {field.key!r} listed twice")
        seen_keys.add(field.key)
        # The name is also the field's `field` label on the invalid-values counter.
        if field.name in seen_field_names:
            raise MetricsConfigError(f"{source}: metric name {field.name!r} listed twice")
        seen_field_names.add(field.name)
        for sample in sample_names(field):
            if sample in seen_names:
                raise MetricsConfigError(
                    f"{source}: {field.metric_name} collides with {seen_names[sample]}"
                )
            seen_names[sample] = field.metric_name


def sample_names(field: FieldMetric) -> tuple[str, ...]:
    """Every sample name the field's metric exposes: what a collision is judged on."""
    name = field.metric_name
    if field.kind == "boolean":
        return (name, f"{name.removesuffix('_total')}_created")
    return tuple(f"{name}{suffix}" for suffix in ("_bucket", "_count", "_sum", "_created"))
