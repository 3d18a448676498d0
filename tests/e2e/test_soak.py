"""`callstream soak`, briefly: real processes, one fault, every acknowledged report stored,
and nothing left behind in the temporary directory it worked in."""

from __future__ import annotations

import re
from pathlib import Path

from tests.support.cli import run_cli, without_settings


def test_a_short_soak_accounts_for_every_report_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    done = run_cli(
        "soak", "--minutes", "0.2", "--rate", "20", "--warm-up", "3", "--first-fault-after", "2",
        env=without_settings() | {"TMPDIR": str(tmp_path)},
        timeout=900,
    )  # fmt: skip

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    faults = done.stdout.split("\nfaults:\n", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"t\+\s+\d", faults), done.stdout
    acknowledged = re.search(r"^acknowledged \(2xx\)\s+(\d+)", done.stdout, re.M)
    assert acknowledged is not None, done.stdout
    assert int(acknowledged[1]) > 0, done.stdout
    assert re.search(r"^LOST \(acked, not stored\)\s+0$", done.stdout, re.M), done.stdout
    # The soak's home, and the tmpfs it mounted for the spool inside it, are gone.
    assert list(tmp_path.iterdir()) == []
