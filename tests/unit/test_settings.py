"""core.settings: declared fields are read, checked and documented by one mechanism."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest

from core.secret import Secret
from core.settings import EnvSettings, SettingsError, declared, setting, settings_class


@settings_class
class Example(EnvSettings):
    name: str = setting("X_NAME", doc="Required: given, or from the environment.")
    count: int = setting("X_COUNT", default=3, minimum=1, maximum=10, doc="A bounded count.")
    ratio: float = setting("X_RATIO", default=0.5, doc="Never negative, as every number.")
    flag: bool = setting("X_FLAG", default=False, doc="A boolean.")
    where: Path | None = setting("X_WHERE", default=None, unset=Path("here"), doc="A path.")
    mode: Literal["a", "b"] | None = setting("X_MODE", default=None, doc="One of a, b.")
    token: Secret | None = setting("X_TOKEN", default=None, secret=True, doc="A secret.")
    inner: int = 0  # not read from the environment


def test_declared_fields_are_read_and_unset_ones_take_their_defaults() -> None:
    env = {"X_NAME": " n ", "X_COUNT": "10", "X_FLAG": "Yes", "X_MODE": "b", "X_TOKEN": "t"}
    got = Example.from_env(env, inner=7)
    assert got == Example("n", 10, 0.5, True, Path("here"), "b", Secret("t"), 7)
    assert "inner" not in declared(Example)


def test_a_set_variable_wins_over_a_given_fallback() -> None:
    assert Example.from_env({}, name="given").name == "given"
    assert Example.from_env({"X_NAME": "env"}, name="given").name == "env"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "X_NAME is not set"),
        ({"X_NAME": "n", "X_COUNT": "0"}, "X_COUNT=0 is below the minimum 1"),
        ({"X_NAME": "n", "X_COUNT": "11"}, "X_COUNT=11 is above the maximum 10"),
        ({"X_NAME": "n", "X_COUNT": "many"}, "X_COUNT='many' is not an integer"),
        ({"X_NAME": "n", "X_RATIO": "-0.1"}, "X_RATIO=-0.1 is below the minimum 0.0"),
        ({"X_NAME": "n", "X_RATIO": "nan"}, "X_RATIO=nan is below the minimum 0.0"),
        ({"X_NAME": "n", "X_FLAG": "maybe"}, "X_FLAG='maybe' is not a boolean"),
        ({"X_NAME": "n", "X_MODE": "c"}, "X_MODE='c' is not one of a, b"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Example.from_env(env)


def test_secrets_never_print_and_show_no_example_value() -> None:
    got = Example.from_env({"X_NAME": "n", "X_TOKEN": "hunter2"})
    assert "hunter2" not in repr(got)
    examples = {s.env: s.example() for s in declared(Example).values()}
    assert examples == {
        "X_NAME": "",
        "X_COUNT": "3",
        "X_RATIO": "0.5",
        "X_FLAG": "false",
        "X_WHERE": "here",
        "X_MODE": "",
        "X_TOKEN": "",
    }


def test_secret_is_declared_exactly_when_the_type_is_secret() -> None:
    @settings_class
    class Printable(EnvSettings):
        password: str = setting("X_PASSWORD", default="", secret=True, doc="A str: printable.")

    @settings_class
    class Undeclared(EnvSettings):
        key: Secret | None = setting("X_KEY", default=None, doc="A Secret not marked secret.")

    with pytest.raises(TypeError, match="X_PASSWORD"):
        Printable.from_env({})
    with pytest.raises(TypeError, match="X_KEY"):
        Undeclared.from_env({})
