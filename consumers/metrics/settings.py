"""Settings of the `metrics` consumer, read once by `MetricsSettings.from_env`: the
CALLSTREAM_METRICS_* variables, each listed with its default and meaning in .env.example.
In CALLSTREAM_METRICS_ASSISTANTS (``number=label``, comma-separated) spaces, dashes, dots
and parentheses in numbers are ignored when matching; the state path is relative to the
working directory; CALLSTREAM_METRICS_CONFIG names the YAML file of more fields to measure
(consumers.metrics.config_file, examples/metrics.yaml).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from consumers.metrics.config_file import FieldMetric, load_fields
from core.settings import SettingsError, env_float, env_opt, env_str

OTHER_ASSISTANT = "other"
_NUMBER = re.compile(r"^\+?[0-9]{2,20}$")
_NUMBER_SEPARATORS = str.maketrans("", "", " -.()")
MAX_LABEL_LENGTH = 64


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
