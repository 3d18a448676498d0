"""Every example in `callstream … --help` is a command line the parser takes as written."""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Iterator

import pytest

from callstream.cli import _parser
from callstream.clihelp import dash_values

_ENV_PREFIX = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from _parsers(child)


def _examples() -> list[str]:
    lines = []
    for parser in _parsers(_parser()):
        for line in (parser.epilog or "").splitlines():
            command = re.split(r" (?:#|\||>) ", line)[0].strip()
            if command.startswith(("callstream ", "KAFKA_", "CALLSTREAM_")):
                lines.append(command)
    return lines


EXAMPLES = _examples()


def test_every_subcommand_has_examples() -> None:
    assert len(EXAMPLES) > 40


@pytest.mark.parametrize("example", EXAMPLES)
def test_an_example_parses(example: str, capsys: pytest.CaptureFixture[str]) -> None:
    words = shlex.split(example)
    while _ENV_PREFIX.match(words[0]):
        words.pop(0)
    assert words[0] == "callstream"
    if "SUBCOMMAND" in words or "--help" in words:
        return
    try:
        _parser().parse_args(dash_values(words[1:]))
    except SystemExit as exc:
        pytest.fail(f"{example!r} is refused: {capsys.readouterr().err.strip()} ({exc.code})")
