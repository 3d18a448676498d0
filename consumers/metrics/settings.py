"""Settings of the `metrics` consumer, read once by `MetricsSettings.from_env`: the
CALLSTREAM_METRICS_* variables. In CALLSTREAM_METRICS_ASSISTANTS (``number=label``,
comma-separated) spaces, dashes, dots and parentheses in numbers are ignored when matching;
the state path is relative to the working directory; CALLSTREAM_METRICS_CONFIG names the YAML
file of more fields to measure (consumers.metrics.config_file, examples/metrics.yaml).
"""

from __future__ import annotations

import math
import re
from functools import cached_property
from pathlib import Path

from consumers.metrics.config_file import FieldMetric, load_fields
from core.settings import EnvSettings, SettingsError, setting, settings_class

OTHER_ASSISTANT = "other"
_NUMBER = re.compile(r"^\+?[0-9]{2,20}$")
_NUMBER_SEPARATORS = str.maketrans("", "", " -.()")
MAX_LABEL_LENGTH = 64


@settings_class
class MetricsSettings(EnvSettings):
    state_path: Path = setting(
        "CALLSTREAM_METRICS_STATE_PATH",
        default=Path(".callstream/metrics.db"),
        doc="SQLite ledger of counted call ids (each call is counted once, ever).",
    )
    assistant_list: str = setting(
        "CALLSTREAM_METRICS_ASSISTANTS",
        default="",
        doc="Assistant numbers that get their own `assistant` label: "
        '+31850835003=sales,+3120... Empty: all "other".',
    )
    success_threshold: float = setting(
        "CALLSTREAM_METRICS_SUCCESS_THRESHOLD",
        default=7.0,
        doc="A numeric success evaluation at or above this is a success (7 for 1..10, 70 for "
        "percentages).",
    )
    sentiment_key: str = setting(
        "CALLSTREAM_METRICS_SENTIMENT_KEY",
        default="sentiment",
        doc="structured_data key holding the 0..10 sentiment score.",
    )
    followup_key: str = setting(
        "CALLSTREAM_METRICS_FOLLOWUP_KEY",
        default="vervolgactie_nodig",
        doc="structured_data key that is true when the call needs a follow-up.",
    )
    technical_problems_key: str = setting(
        "CALLSTREAM_METRICS_TECHNICAL_PROBLEMS_KEY",
        default="technische_problemen",
        doc="structured_data key that is true when the call had technical problems.",
    )
    config_path: Path | None = setting(
        "CALLSTREAM_METRICS_CONFIG",
        default=None,
        doc="YAML file of more structured_data fields to measure (examples/metrics.yaml). "
        "Empty: none.",
    )

    def __post_init__(self) -> None:
        if len(self.builtin_keys) < 3:
            raise SettingsError(
                "CALLSTREAM_METRICS_SENTIMENT_KEY, CALLSTREAM_METRICS_FOLLOWUP_KEY and "
                "CALLSTREAM_METRICS_TECHNICAL_PROBLEMS_KEY must be three different keys"
            )
        if not math.isfinite(self.success_threshold):
            raise SettingsError(
                f"CALLSTREAM_METRICS_SUCCESS_THRESHOLD={self.success_threshold} is not finite"
            )
        _ = self.assistants, self.fields  # parsed now: a bad value stops the consumer at start-up

    @property
    def builtin_keys(self) -> set[str]:
        return {self.sentiment_key, self.followup_key, self.technical_problems_key}

    @cached_property
    def assistants(self) -> tuple[tuple[str, str], ...]:
        """(normalised number, label) pairs: a tuple keeps the settings truly immutable."""
        return parse_assistants(self.assistant_list)

    @cached_property
    def fields(self) -> tuple[FieldMetric, ...]:
        if self.config_path is None:
            return ()
        return load_fields(self.config_path, self.builtin_keys)


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
