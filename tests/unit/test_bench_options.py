"""`callstream bench`'s command line: a mistyped option is a usage error, not a traceback."""

from __future__ import annotations

import argparse

import pytest

from callstream.bench.options import PHASES, BenchOptions, add_arguments
from tests.support.cli import cli_env, run_cli


def _options(*argv: str) -> BenchOptions:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return BenchOptions.from_args(parser.parse_args(argv))


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (("--phases", "wrk,catchup"), "argument --phases: unknown phases ['wrk', 'catchup']"),
        (("--env", "FOO"), "argument --env: --env wants KEY=VALUE, not 'FOO'"),
        (("--env", "=1"), "argument --env: --env wants KEY=VALUE, not '=1'"),
    ],
)
def test_a_bad_bench_option_is_a_usage_error_without_a_traceback(
    argv: tuple[str, ...], complaint: str
) -> None:
    done = run_cli("bench", *argv, env=cli_env())

    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("usage: callstream bench")
    assert f"callstream bench: error: {complaint}" in done.stderr
    assert done.stdout == ""


def test_phases_run_in_the_bench_order_whatever_order_they_are_named_in() -> None:
    assert _options("--phases", "drain, ingress , ").phases == ("ingress", "drain")
    assert _options("--phases", "spool", "--profile").phases == ("spool", "profile")
    assert _options().phases == PHASES[:-1]
    assert _options("--profile").phases == PHASES


def test_env_pairs_keep_everything_after_the_first_equals_sign() -> None:
    options = _options("--env", "A=1", "--env", "B=x=y", "--env", "C=")

    assert options.env == (("A", "1"), ("B", "x=y"), ("C", ""))
