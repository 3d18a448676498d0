"""Reading report values the way the metrics count them: numbers, flags and outcomes."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

Outcome = Literal["success", "failure", "unknown"]
OUTCOMES: tuple[Outcome, ...] = ("success", "failure", "unknown")
EVALUATION_RESULTS = ("true", "false", "other")

_TRUE_WORDS = frozenset({"true", "yes"})
_FALSE_WORDS = frozenset({"false", "no"})
_NUMERIC = re.compile(r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")


def as_number(value: Any) -> float | None:
    """A finite number, also from a numeric string (LLM extractions sometimes quote them)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str) and _NUMERIC.match(value.strip()):
        number = float(value.strip())
    else:
        return None
    return number if math.isfinite(number) else None


def as_flag(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    return None


def success_outcome(evaluation: bool | float | str | None, threshold: float) -> Outcome:
    flag = as_flag(evaluation)
    if flag is not None:
        return "success" if flag else "failure"
    number = as_number(evaluation)
    if number is None:
        return "unknown"
    return "success" if number >= threshold else "failure"


def evaluation_result(evaluation: bool | float | str) -> str:
    if evaluation is True or (isinstance(evaluation, str) and evaluation.strip().lower() == "true"):
        return "true"
    if evaluation is False or (
        isinstance(evaluation, str) and evaluation.strip().lower() == "false"
    ):
        return "false"
    return "other"
