"""`python -m callstream.bench [options]` is `callstream bench [options]`."""

from __future__ import annotations

import sys

from callstream.cli import main

raise SystemExit(main(["bench", *sys.argv[1:]]))
