"""How the `callstream` command helps a person: every subcommand's examples, the version,
and relative times (`--from -2h`) that argparse would otherwise take for options."""

from __future__ import annotations

import argparse
import re
from collections.abc import Collection, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

# `--from -2h`: argparse takes a value starting with "-" for an option and refuses it.
_DASH_VALUED = frozenset({"--from", "--to", "--since"})
_BACK_FROM_NOW = re.compile(r"^-(\d+[a-z]+|P[0-9DTHMS]+)$", re.IGNORECASE)


def dash_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in _DASH_VALUED and _BACK_FROM_NOW.match(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


class HelpFormatter(argparse.HelpFormatter):
    """Wraps prose; keeps indented blocks (the examples) exactly as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks = []
        for block in text.split("\n\n"):
            if block.startswith("  "):
                blocks.append("\n".join(indent + line for line in block.splitlines()))
            else:
                blocks.append(super()._fill_text(block, width, indent))
        return "\n\n".join(blocks)


def examples(*lines: str) -> str:
    """The epilog every subcommand has: commands to copy, each with what it does."""
    return "examples:\n\n" + "\n".join(f"  {line}" for line in lines)


def command(
    sub: Any, name: str, help: str, *lines: str, description: str | None = None
) -> argparse.ArgumentParser:
    """A subcommand of `sub` (an argparse subparsers action) with its example `lines`."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=description or help[:1].upper() + help[1:] + ".",
        epilog=examples(*lines),
        formatter_class=HelpFormatter,
    )
    return parser


def table(rows: Sequence[Sequence[str]], right: Collection[int] = ()) -> list[str]:
    """`rows` (the first is the header) as lines of aligned columns, two spaces apart; the
    columns numbered in `right` are right-aligned (numbers)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def version() -> str:
    try:
        return f"callstream {package_version('callstream')}"
    except PackageNotFoundError:  # pragma: no cover - run from a tree that is not installed
        return "callstream (not installed)"
