"""The command line helps a person: every subcommand shows examples, every argument says
what it is for, relative times reach the replay, and `.env` is read the compose way."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka.errors import CoordinatorNotAvailableError, GroupAuthorizationFailedError

from callstream.cli import _parser
from callstream.clihelp import dash_values
from callstream.envfile import with_env_file
from callstream.replayplan import parse_time
from core.logs import CoordinatorWait


def subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*path, name), child
                yield from subcommands(child, (*path, name))


EVERY_SUBCOMMAND = pytest.mark.parametrize(
    ("path", "parser"),
    [pytest.param(path, parser, id=" ".join(path)) for path, parser in subcommands(_parser())],
)


def test_the_parser_has_subcommands_to_walk() -> None:
    names = {" ".join(path) for path, _ in subcommands(_parser())}
    assert {"run", "consumer", "consumers", "replay", "dlq list", "dlq redrive"} <= names


@EVERY_SUBCOMMAND
def test_every_subcommand_help_shows_an_example_of_itself(
    path: tuple[str, ...], parser: argparse.ArgumentParser
) -> None:
    text = parser.format_help()
    assert "examples:" in text
    invocation = "callstream " + " ".join(path)
    lines = [line.strip() for line in text.split("examples:", 1)[1].splitlines()]
    assert any(line.startswith(invocation) for line in lines), text


@EVERY_SUBCOMMAND
def test_every_argument_says_what_it_is_for(
    path: tuple[str, ...], parser: argparse.ArgumentParser
) -> None:
    silent = [
        action.dest
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
        and not action.help
    ]
    assert silent == []


def test_the_top_level_help_has_examples_and_a_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert "callstream run" in _parser().format_help().split("examples:", 1)[1]
    with pytest.raises(SystemExit) as stopped:
        _parser().parse_args(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.startswith("callstream 0.")


def test_a_time_back_from_now_after_from_is_kept_as_its_value() -> None:
    argv = ["replay", "--consumer", "storage", "--from", "-7d", "--to", "-PT2H", "--dry-run"]
    args = _parser().parse_args(dash_values(argv))
    assert (args.since, args.until, args.dry_run) == ("-7d", "-PT2H", True)
    # An option that happens to follow --from is left for argparse to judge.
    assert dash_values(["--from", "--dry-run"]) == ["--from", "--dry-run"]


def test_relative_times_count_back_from_now() -> None:
    now = datetime(2025, 9, 10, 12, 0, tzinfo=UTC)
    assert parse_time("-7d", now=now) == now - timedelta(days=7)
    assert parse_time("-2h", now=now) == now - timedelta(hours=2)
    assert parse_time("-30m", now=now) == now - timedelta(minutes=30)
    # kafka-consumer-groups --by-duration's own spelling.
    assert parse_time("-P7D", now=now) == now - timedelta(days=7)
    assert parse_time("-PT2H30M", now=now) == now - timedelta(hours=2, minutes=30)
    assert parse_time("-P1DT1S", now=now) == now - timedelta(days=1, seconds=1)
    for wrong in ("-2x", "-P", "-PT", "-P2H"):
        with pytest.raises(ValueError, match="back from now"):
            parse_time(wrong, now=now)


def test_env_file_fills_in_what_the_environment_does_not_set(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# compose reads this file too\n"
        "CALLSTREAM_INGRESS_PORT=8085\n"
        "CALLSTREAM_TOPIC='from.file'\n"
        "export CALLSTREAM_LOG_LEVEL=DEBUG\n"
        "CALLSTREAM_ONLY_A_NAME\n"
    )
    env = with_env_file({"CALLSTREAM_TOPIC": "from.environment", "HOME": "/root"}, dotenv)
    assert env == {
        "CALLSTREAM_INGRESS_PORT": "8085",
        "CALLSTREAM_TOPIC": "from.environment",
        "CALLSTREAM_LOG_LEVEL": "DEBUG",
        "HOME": "/root",
    }


def test_no_env_file_leaves_the_environment_as_it_is(tmp_path: Path) -> None:
    assert with_env_file({"A": "1"}, tmp_path / ".env") == {"A": "1"}


def coordinator_failure(error: Exception) -> logging.LogRecord:
    """The record aiokafka's group coordinator logs when a lookup fails."""
    return logging.LogRecord(
        CoordinatorWait.LOGGER, logging.ERROR, __file__, 1, CoordinatorWait.MESSAGE, (error,), None
    )


def test_a_burst_of_coordinator_lookups_is_one_waiting_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    waiting = CoordinatorWait()
    first = coordinator_failure(CoordinatorNotAvailableError())
    assert waiting.filter(first)
    assert (first.levelname, first.getMessage()) == ("INFO", "waiting for the group coordinator")
    assert not any(
        waiting.filter(coordinator_failure(CoordinatorNotAvailableError())) for _ in range(20)
    )


def coordinator_dropped() -> logging.LogRecord:
    return logging.LogRecord(
        CoordinatorWait.LOGGER, logging.WARNING, __file__, 1, CoordinatorWait.DEAD, (1, "g"), None
    )


def test_coordinators_dropped_during_the_wait_are_part_of_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    waiting = CoordinatorWait()
    # Outside a wait, a dropped coordinator is news: a broker went away.
    assert waiting.filter(coordinator_dropped())
    assert waiting.filter(coordinator_failure(CoordinatorNotAvailableError()))
    assert not any(waiting.filter(coordinator_dropped()) for _ in range(5))


def test_a_coordinator_refusal_that_waiting_cannot_heal_stays_an_error() -> None:
    record = coordinator_failure(GroupAuthorizationFailedError())
    assert CoordinatorWait().filter(record)
    assert record.levelname == "ERROR"


def test_the_waiting_line_is_left_out_below_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    assert not CoordinatorWait().filter(coordinator_failure(CoordinatorNotAvailableError()))
