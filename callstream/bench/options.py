"""`callstream bench` options (stdlib only: the CLI builds its parser from this module)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

PHASES = (
    "baselines",
    "ingress",
    "fixed-rate",
    "catch-up",
    "spool",
    "drain",
    "large",
    "profile",
)
DEFAULT_PHASES = PHASES[:-1]


@dataclass(frozen=True, slots=True)
class BenchOptions:
    out_dir: Path = Path("bench-results")
    sample: Path | None = None  # None: the report shipped with callstream
    duration: float = 20.0
    warmup: float = 2.0
    connections: int = 128
    threads: int = 1
    rate: float = 1000.0
    rate_duration: float = 20.0
    long_every: int = 20
    catchup_records: int = 100_000
    drain_records: int = 100_000
    postgres: bool = True
    profile_seconds: float = 15.0
    keep_temp: bool = False
    phases: tuple[str, ...] = DEFAULT_PHASES
    # For before/after comparisons: extra environment for every service under test, and
    # another source tree (a scratch copy with a proposed change) to run them from.
    env: tuple[tuple[str, str], ...] = ()
    pythonpath: Path | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchOptions:
        # Every other field has an argument of its own name (add_arguments below).
        derived: dict[str, Any] = {
            "postgres": not args.no_postgres,
            "phases": _in_bench_order(args.phases, profile=args.profile),
            "env": tuple(args.env),
        }
        plain = {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in derived}
        options = cls(**plain, **derived)
        return cls.quick(options) if args.quick else options

    @staticmethod
    def quick(base: BenchOptions) -> BenchOptions:
        """A smoke run of every phase in under two minutes; its figures are not for quoting."""
        return replace(
            base,
            duration=5.0,
            warmup=1.0,
            rate_duration=5.0,
            catchup_records=20_000,
            drain_records=20_000,
            profile_seconds=5.0,
        )


# --phases and --env are checked as argparse types, so that a mistake is a usage error.
def _phase_list(text: str) -> tuple[str, ...]:
    chosen = tuple(name for part in text.split(",") if (name := part.strip()))
    unknown = [p for p in chosen if p not in PHASES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown phases {unknown}; known: {', '.join(PHASES)}")
    return chosen


def _in_bench_order(chosen: tuple[str, ...] | None, *, profile: bool) -> tuple[str, ...]:
    chosen = chosen or DEFAULT_PHASES
    if profile and "profile" not in chosen:
        chosen = (*chosen, "profile")
    return tuple(p for p in PHASES if p in chosen)


def _pair(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--env wants KEY=VALUE, not {item!r}")
    return key, value


# (flag, type, help) in --help's order: each takes its default from BenchOptions' field of the
# same name; bool is a flag of its own (store_true).
_ARGUMENTS: tuple[tuple[str, type, str], ...] = (
    (
        "--sample",
        Path,
        "a flat end-of-call report to send (default: the one shipped with callstream)",
    ),
    ("--duration", float, "seconds per wrk run (%(default)s)"),
    ("--warmup", float, "seconds (%(default)s)"),
    ("--connections", int, "wrk -c (%(default)s)"),
    ("--threads", int, "wrk -t (%(default)s)"),
    ("--rate", float, "open-loop reports/s (%(default)s)"),
    ("--rate-duration", float, "seconds (%(default)s)"),
    (
        "--long-every",
        int,
        "open loop and large reports: every Nth report is a long one; 0 for none (%(default)s)",
    ),
    ("--catchup-records", int, "records pre-filled for the catch-up and replay runs (%(default)s)"),
    ("--drain-records", int, "reports left in the spool for the drain run (%(default)s)"),
    ("--no-postgres", bool, "skip the PostgreSQL catch-up and replay"),
    ("--profile", bool, "also profile the ingress under wrk load with py-spy (in the bench extra)"),
    ("--profile-seconds", float, "how long py-spy records with --profile (%(default)s)"),
    ("--quick", bool, "short runs to check the bench itself works"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchOptions()
    parser.add_argument("--out-dir", type=Path, default=d.out_dir, help="default: %(default)s")
    parser.add_argument(
        "--chart",
        type=Path,
        metavar="FILE.json",
        help="run nothing: redraw the chart of an earlier run from its results file, e.g."
        " --chart bench-results/20261207T140218Z.json --chart-out docs/bench-latest.png",
    )
    parser.add_argument(
        "--chart-out",
        type=Path,
        metavar="FILE.png",
        help="where --chart writes (default: next to the results file, .json -> .png)",
    )
    for flag, kind, text in _ARGUMENTS:
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=text)
        else:
            default = getattr(d, flag[2:].replace("-", "_"))
            parser.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument(
        "--phases",
        type=_phase_list,
        help=f"comma-separated, in this order: {', '.join(PHASES)} (default: all but profile)",
    )
    parser.add_argument(
        "--env",
        action="append",
        type=_pair,
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the services under test, e.g. CALLSTREAM_BATCH_SIZE=2000",
    )
    parser.add_argument(
        "--pythonpath",
        type=Path,
        help="run the services from this source tree (a scratch copy with a change to measure)",
    )
    parser.add_argument(
        "--keep-temp", action="store_true", help="keep the temp dir (logs, databases)"
    )
