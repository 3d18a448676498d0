"""Settings of the `metrics` consumer: the environment, plus an optional YAML file of fields.

Environment (read once by `MetricsSettings.from_env`):

* ``CALLSTREAM_METRICS_STATE_PATH``: the SQLite ledger of counted calls
  (default ``.callstream/metrics.db``, relative to the working directory).
* ``CALLSTREAM_METRICS_ASSISTANTS``: comma-separated assistant numbers that get their own
  ``assistant`` label, each optionally ``number=label`` (``+31850835003=sales``). Spaces,
  dashes, dots and parentheses in numbers are ignored when matching. Every other number is
  ``other``.
* ``CALLSTREAM_METRICS_SUCCESS_THRESHOLD``: a numeric success evaluation at or above this is a
  success, below it a failure (default 7, for a 1..10 rubric; use 70 for a percentage one).
* ``CALLSTREAM_METRICS_SENTIMENT_KEY``, ``CALLSTREAM_METRICS_FOLLOWUP_KEY``,
  ``CALLSTREAM_METRICS_TECHNICAL_PROBLEMS_KEY``: the structured_data keys behind the built-in
  sentiment, follow-up and technical-problem metrics.
* ``CALLSTREAM_METRICS_CONFIG``: a YAML file naming more structured_data fields to measure
  (see examples/metrics.yaml).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from core.settings import SettingsError, env_float, env_opt, env_str

FieldKind = Literal["numeric", "boolean"]

OTHER_ASSISTANT = "other"
CUSTOM_PREFIX = "callstream_call_field_"

# The Prometheus metric-name charset without the colon, which is reserved for recording rules.
_NAME = re.compile(r"^[a-zA-Z0-9_]+$")
_NUMBER = re.compile(r"^\+?[0-9]{2,20}$")
_NUMBER_SEPARATORS = str.maketrans("", "", " -.()")
# Names that would make a histogram or counter expose samples indistinguishable from another
# metric's (`x_bucket` next to `x`'s own buckets), or read as a unit-less counter.
_RESERVED_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created", "_info")
MAX_NAME_LENGTH = 100
MAX_LABEL_LENGTH = 64
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


# No slots: from_env reads the defaults back off the class.
@dataclass(frozen=True)
class MetricsSettings:
    state_path: Path = Path(".callstream/metrics.db")
    # (normalised number, label) pairs: a tuple keeps the settings truly immutable.
    assistants: tuple[tuple[str, str], ...] = ()
    success_threshold: float = 7.0
    sentiment_key: str = "sentiment"
    followup_key: str = "vervolgactie_nodig"
    technical_problems_key: str = "technische_problemen"
    fields: tuple[FieldMetric, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> MetricsSettings:
        sentiment_key = env_str(env, "CALLSTREAM_METRICS_SENTIMENT_KEY", cls.sentiment_key)
        followup_key = env_str(env, "CALLSTREAM_METRICS_FOLLOWUP_KEY", cls.followup_key)
        technical_key = env_str(
            env, "CALLSTREAM_METRICS_TECHNICAL_PROBLEMS_KEY", cls.technical_problems_key
        )
        builtin_keys = {sentiment_key, followup_key, technical_key}
        if len(builtin_keys) < 3:
            raise SettingsError(
                "CALLSTREAM_METRICS_SENTIMENT_KEY, CALLSTREAM_METRICS_FOLLOWUP_KEY and "
                "CALLSTREAM_METRICS_TECHNICAL_PROBLEMS_KEY must be three different keys"
            )
        config_path = env_opt(env, "CALLSTREAM_METRICS_CONFIG")
        return cls(
            state_path=Path(env_str(env, "CALLSTREAM_METRICS_STATE_PATH", str(cls.state_path))),
            assistants=parse_assistants(env.get("CALLSTREAM_METRICS_ASSISTANTS", "")),
            success_threshold=_threshold(env),
            sentiment_key=sentiment_key,
            followup_key=followup_key,
            technical_problems_key=technical_key,
            fields=load_fields(Path(config_path), builtin_keys) if config_path else (),
        )


def _threshold(env: Mapping[str, str]) -> float:
    value = env_float(
        env, "CALLSTREAM_METRICS_SUCCESS_THRESHOLD", MetricsSettings.success_threshold
    )
    if not math.isfinite(value):
        raise SettingsError(f"CALLSTREAM_METRICS_SUCCESS_THRESHOLD={value} is not finite")
    return value


def normalise_number(number: str) -> str:
    """The form both the allow-list and the reports' numbers are compared in."""
    return number.strip().translate(_NUMBER_SEPARATORS)


def parse_assistants(raw: str) -> tuple[tuple[str, str], ...]:
    variable = "CALLSTREAM_METRICS_ASSISTANTS"
    pairs: dict[str, str] = {}
    for entry in raw.split(","):
        if not entry.strip():
            continue  # tolerate a trailing comma
        number_text, sep, label_text = entry.partition("=")
        number = normalise_number(number_text)
        if not _NUMBER.match(number):
            raise SettingsError(
                f"{variable}: {number_text.strip()!r} is not a phone number (+31850835003)"
            )
        label = label_text.strip() if sep else number
        if not label or len(label) > MAX_LABEL_LENGTH or not label.isprintable():
            raise SettingsError(
                f"{variable}: the label for {number} must be 1..{MAX_LABEL_LENGTH} printable "
                "characters"
            )
        if label == OTHER_ASSISTANT:
            raise SettingsError(
                f"{variable}: {OTHER_ASSISTANT!r} is the label of every number not listed"
            )
        if number in pairs:
            raise SettingsError(f"{variable}: {number} is listed twice")
        pairs[number] = label
    return tuple(pairs.items())


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
    return parse_fields(document, builtin_keys, source=str(path))


def parse_fields(
    document: Any, builtin_keys: set[str], *, source: str = "metrics config"
) -> tuple[FieldMetric, ...]:
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
    base = f"{CUSTOM_PREFIX}{field.name}"
    if field.kind == "boolean":
        return (f"{base}_true_total", f"{base}_true_created")
    return (f"{base}_bucket", f"{base}_count", f"{base}_sum", f"{base}_created")
