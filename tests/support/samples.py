"""Where the shared sample report lives (../shared beside the repo, as in CI)."""

from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "samples" / "end-of-call-report.json"
