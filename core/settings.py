"""Settings declared once: each field of a frozen settings dataclass names its environment
variable, default, bounds, a one-line doc and whether it is secret, and one `from_env` reads
them all, with errors that name the variable.

The declarations are also what `.env.example` is generated from (callstream.envexample) and
what the deployment tests check compose against, so a variable cannot be read without being
documented, nor documented without being read.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Self, TypeVar

from core.secret import Secret, secrets_from

T = TypeVar("T")

# Where a dataclass field keeps its declaration (dataclasses.field(metadata=...)).
_KEY: Final = "callstream.setting"
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


class SettingsError(ValueError):
    """An environment variable holds something its setting cannot use."""


class _Missing:
    """No default: the caller of from_env must supply the value, or the variable be set."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()


@dataclass(frozen=True, slots=True)
class Setting:
    env: str
    doc: str
    default: object = MISSING
    # Every count, size and duration callstream reads is non-negative; a declaration that
    # allows less (retention -1: forever) says so.
    minimum: float | None = 0
    maximum: float | None = None
    secret: bool = False  # the type must be Secret; .env.example never shows a value
    # From the environment an empty variable means this, when it differs from the dataclass
    # default (which is what settings built in code, i.e. tests, get).
    unset: object = MISSING

    def is_set(self, env: Mapping[str, str]) -> bool:
        return bool(env.get(self.env, "").strip())

    @property
    def fallback(self) -> object:
        return self.default if self.unset is MISSING else self.unset

    def read(self, env: Mapping[str, str], hint: Any, fallback: object = MISSING) -> Any:
        """The variable's value as `hint`; empty or absent: `fallback`, else the default."""
        if _is_secret(hint) != self.secret:
            raise TypeError(f"{self.env}: declare secret=True exactly when the type is Secret")
        raw = env.get(self.env, "").strip()
        if not raw:
            value = self.fallback if fallback is MISSING else fallback
            if value is MISSING:
                raise SettingsError(f"{self.env} is not set")
            return value
        value = _parser(hint, self.env)(raw)
        self._check_bounds(value)
        return value

    def _check_bounds(self, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return
        # A float setting's error shows its bound as a float (0.0, not 0), like its value.
        minimum, maximum = (
            (None if b is None else float(b) for b in (self.minimum, self.maximum))
            if isinstance(value, float)
            else (self.minimum, self.maximum)
        )
        # `not >=` rather than `<`: NaN is below every minimum.
        if minimum is not None and not value >= minimum:
            raise SettingsError(f"{self.env}={value} is below the minimum {minimum}")
        if maximum is not None and not value <= maximum:
            raise SettingsError(f"{self.env}={value} is above the maximum {maximum}")

    def example(self) -> str:
        """The value .env.example shows: the default, empty for secrets and computed ones."""
        value = self.fallback
        if self.secret or value is MISSING or value is None or value == ():
            return ""
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        text = _render(value)
        return f'"{text}"' if " " in text else text


def setting(
    env: str,
    *,
    default: object = MISSING,
    doc: str,
    minimum: float | None = 0,
    maximum: float | None = None,
    secret: bool = False,
    unset: object = MISSING,
) -> Any:
    """A dataclass field read from `env` (see Setting for the rest). Keyword arguments only:
    type checkers read `default=` to know the field has one."""
    declared = Setting(env, doc, default, minimum, maximum, secret, unset)
    if default is MISSING:
        return dataclasses.field(metadata={_KEY: declared})
    return dataclasses.field(default=default, metadata={_KEY: declared})


@typing.dataclass_transform(frozen_default=True, field_specifiers=(setting, dataclasses.field))
def settings_class(cls: type[T]) -> type[T]:
    """A frozen dataclass whose `setting()` fields are read by from_env.

    Rather than a bare @dataclass: type checkers then know which declared fields have a
    default (the `default` argument of setting), as they do for dataclasses.field.
    """
    return dataclasses.dataclass(frozen=True)(cls)


def declared(cls: type[Any]) -> dict[str, Setting]:
    """Field name -> declaration, for the fields of `cls` read from the environment."""
    return {f.name: f.metadata[_KEY] for f in dataclasses.fields(cls) if _KEY in f.metadata}


def field_from_env(cls: type[Any], name: str, env: Mapping[str, str]) -> Any:
    """One declared field of `cls`, for a tool that needs it without the whole service."""
    return declared(cls)[name].read(env, typing.get_type_hints(cls)[name])


def to_env(settings: object) -> dict[str, str]:
    """The variables that make `from_env` give back `settings` (unset ones left out):
    for handing a service's settings to a child process as its environment. Settings
    nested in a field (KafkaSettings.security) are included."""
    env: dict[str, str] = {}
    assert dataclasses.is_dataclass(settings)
    decls = declared(type(settings))
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.name in decls:
            if value is not None and value != ():
                env[decls[f.name].env] = _render(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            env |= to_env(value)
    return env


def _render(value: object) -> str:
    if isinstance(value, Secret):
        return value.reveal()
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(_render(item) for item in value)
    return str(value)


class EnvSettings:
    """Mixin for a frozen dataclass of declared settings: `Settings.from_env(env, ...)`."""

    @classmethod
    def from_env(cls, env: Mapping[str, str], **given: Any) -> Self:
        """`given` holds the fields that are not read from the environment (other settings),
        and fallbacks for declared ones: a set variable wins over them, they win over the
        default."""
        hints = typing.get_type_hints(cls)
        values = dict(given)
        for name, decl in declared(cls).items():
            values[name] = decl.read(env, hints[name], given.get(name, MISSING))
        return cls(**values)


# -- parsing one value ---------------------------------------------------------------------


def _is_secret(hint: Any) -> bool:
    return Secret in (hint, *typing.get_args(hint))


def _parser(hint: Any, env: str) -> Callable[[str], Any]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        # `X | None`: None is what an empty variable gives; a set one is an X.
        (hint,) = (arg for arg in args if arg is not type(None))
        args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        return lambda raw: _one_of(raw, args, env)
    if hint == tuple[Secret, ...]:
        return secrets_from
    simple: dict[Any, Callable[[str], Any]] = {
        str: str,
        Path: Path,
        Secret: Secret,
        int: lambda raw: _number(int, raw, env, "an integer"),
        float: lambda raw: _number(float, raw, env, "a number"),
        bool: lambda raw: _boolean(raw, env),
    }
    if hint not in simple:
        raise TypeError(f"{env}: no parser for {hint!r}")
    return simple[hint]


def _number(kind: Callable[[str], T], raw: str, env: str, what: str) -> T:
    try:
        return kind(raw)
    except ValueError:
        raise SettingsError(f"{env}={raw!r} is not {what}") from None


def _boolean(raw: str, env: str) -> bool:
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise SettingsError(f"{env}={lowered!r} is not a boolean (true/false)")


def _one_of(raw: str, allowed: tuple[Any, ...], env: str) -> Any:
    # Case aside, as librdkafka reads `sasl_ssl`: the canonical spelling is what code sees.
    for choice in allowed:
        if str(choice).casefold() == raw.casefold():
            return choice
    raise SettingsError(f"{env}={raw!r} is not one of {', '.join(map(str, allowed))}")
