"""Where the ingress's CPU goes: py-spy samples under wrk load, summed by pipeline stage.

py-spy records collapsed stacks (`frame;frame;frame count`, one line per distinct stack,
idle samples left out). Each sample is put in the stage of the innermost frame that
belongs to one, so a fastavro call made from the handler counts as Avro encoding, and an
asyncio frame counts as the event loop only when no stage frame sits above it.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# (stage, function-name prefixes or None for any, file substrings); the ingress's stages
# and the consumer's side by side, since one summary serves both.
_RULES: tuple[tuple[str, tuple[str, ...] | None, tuple[str, ...]], ...] = (
    ("metrics (prometheus_client)", None, ("prometheus_client",)),
    ("Kafka client (aiokafka)", None, ("aiokafka",)),
    ("Avro encode", ("Encoder.",), ("schemas/codec.py",)),
    ("Avro decode", None, ("schemas/codec.py", "fastavro")),
    ("report model (schemas/report.py)", None, ("schemas/report.py",)),
    ("normalise", ("difference", "same", "merge"), ("schemas/jsonvalue.py",)),
    (
        "normalise",
        None,
        (
            "schemas/normalise.py",
            "schemas/converters.py",
            "schemas/fieldmaps.py",
            "schemas/turns.py",
        ),
    ),
    ("JSON parse + bounds check", None, ("schemas/jsonvalue.py",)),
    ("signature (HMAC)", None, ("ingress/auth.py", "hmac.py")),
    ("publish wrapper (ingress/publisher.py)", None, ("ingress/publisher.py",)),
    ("spool (ingress/spool.py)", None, ("ingress/spool.py",)),
    ("handler and middleware", None, ("ingress/",)),
    ("rows and SQL (consumers/storage/)", None, ("consumers/storage/",)),
    ("PostgreSQL client (asyncpg)", None, ("asyncpg",)),
    ("runner (consumers/runner.py)", None, ("consumers/runner.py",)),
    ("storage consumer", None, ("consumers/",)),
    ("HTTP (aiohttp)", None, ("aiohttp", "multidict", "yarl")),
    ("logging", None, ("logging/",)),
)
_FALLBACK = "event loop and the rest"
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


@dataclass(frozen=True, slots=True)
class Frame:
    name: str
    file: str

    def __str__(self) -> str:
        return f"{self.name} ({_short(self.file)})"


def _short(file: str) -> str:
    for marker in ("site-packages/", "/lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1].lstrip("/")
    return file.removeprefix(str(Path.cwd()) + "/")


def _parse_frame(text: str) -> Frame:
    match = _FRAME.match(text.strip())
    return Frame(match["name"], match["file"]) if match else Frame(text.strip(), "")


def _stage(frame: Frame) -> str | None:
    for stage, names, files in _RULES:
        named = names is None or frame.name.startswith(names)
        if named and any(f in frame.file for f in files):
            return stage
    return None


def summarise(collapsed: Path, top: int = 15) -> dict[str, object]:
    stages: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [
            _parse_frame(f)
            for f in stack.split(";")
            if not f.startswith(("process ", "thread ")) and f
        ]
        if not frames:
            continue
        total += count
        leaves[str(frames[-1])] += count
        for name in {str(f) for f in frames}:
            inclusive[name] += count
        stage = next((s for f in reversed(frames) if (s := _stage(f)) is not None), _FALLBACK)
        stages[stage] += count

    def share(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in counter.most_common(n)] if total else []

    app = Counter(
        {k: v for k, v in inclusive.items() if any(p in k for p in ("ingress/", "schemas/"))}
    )
    return {
        "samples": total,
        "stages_percent": share(stages, len(stages)),
        "self_percent": share(leaves, top),
        "inclusive_app_percent": share(app, top),
    }


def render(summary: dict[str, object]) -> str:
    lines = [f"py-spy samples (on CPU, all threads): {summary['samples']}"]
    for title, key in (
        ("by stage (innermost stage frame)", "stages_percent"),
        ("hottest functions, self time", "self_percent"),
        ("ingress and schemas functions, inclusive", "inclusive_app_percent"),
    ):
        lines.append(f"  {title}:")
        rows = summary.get(key)
        if isinstance(rows, list):
            lines += [f"    {pct:5.1f}%  {name}" for name, pct in rows]
    return "\n".join(lines)


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")
