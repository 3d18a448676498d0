"""Reading a bench results file (report.write_json) back into `Results`, for redrawing its
chart without running the bench again.

The reader follows the dataclasses' own type hints, so a field the bench gains later is read
without a change here; a file from an older bench, missing that field, is refused by name.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import orjson

from callstream.bench.report import Results


class ResultsFileError(ValueError):
    """The file is missing, is not JSON, or is not what `callstream bench` writes."""


def read_results(path: Path) -> Results:
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise ResultsFileError(f"no such file: {path}") from None
    except OSError as exc:
        raise ResultsFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError as exc:
        raise ResultsFileError(f"{path} is not JSON ({exc})") from None
    if not isinstance(data, dict) or not {"meta", "wrk", "consumers"} <= data.keys():
        raise ResultsFileError(
            f"{path} is not a bench results file (no meta, wrk and consumers at the top)"
        )
    try:
        results: Results = _build(Results, data, "results")
    except (TypeError, ValueError, KeyError) as exc:
        raise ResultsFileError(f"{path} is not a bench results file: {exc}") from None
    return results


def _build(kind: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(kind)):
            return None
        return _build(options[0], value, where)
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        if not isinstance(value, dict):
            raise ValueError(f"{where} should be an object")
        hints = typing.get_type_hints(kind)
        fields: dict[str, Any] = {}
        for f in dataclasses.fields(kind):
            if f.name in value:
                fields[f.name] = _build(hints[f.name], value[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where} has no {f.name}")
        return kind(**fields)
    if origin is list:
        (item,) = typing.get_args(kind)
        return [_build(item, v, f"{where}[{i}]") for i, v in enumerate(_array(value, where))]
    if origin is tuple:
        items = typing.get_args(kind)
        array = _array(value, where)
        if len(array) != len(items):
            raise ValueError(f"{where} should have {len(items)} items")
        return tuple(_build(t, v, where) for t, v in zip(items, array, strict=True))
    if origin is dict:
        _, item = typing.get_args(kind)
        if not isinstance(value, dict):
            raise ValueError(f"{where} should be an object")
        return {k: _build(item, v, f"{where}.{k}") for k, v in value.items()}
    if kind is float:
        if value is None:
            # orjson writes NaN and inf (a figure that was not measured) as null.
            return math.nan
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where} should be a number")
        return float(value)
    if kind in (int, str, bool):
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{where} should be {kind.__name__}")
        return value
    return value  # Any


def _array(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{where} should be an array")
    return value
