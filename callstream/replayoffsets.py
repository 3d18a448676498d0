"""The offsets a replay replaced, kept in a file so that `callstream replay --restore FILE`
can put the group back where it was (docs/replay.md).

`replay --consumer NAME --from T` (without --to) moves a group's committed offsets and
leaves them there; this file is the undo. A partition the group had never committed is
written as null and restored to the log start, where the group would have begun reading.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson


@dataclass(frozen=True, slots=True)
class SavedOffsets:
    group_id: str
    topic: str
    #: partition -> the committed offset before the replay (None: there was none)
    offsets: dict[int, int | None]
    saved_at: datetime

    def dump(self) -> bytes:
        return orjson.dumps(
            {
                "group_id": self.group_id,
                "topic": self.topic,
                "saved_at": self.saved_at.isoformat(),
                "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
            },
            option=orjson.OPT_INDENT_2,
        )

    @classmethod
    def load(cls, path: Path) -> SavedOffsets:
        """ValueError naming the file when it is not one `replay` wrote."""
        try:
            data = orjson.loads(path.read_bytes())
            return cls(
                group_id=str(data["group_id"]),
                topic=str(data["topic"]),
                offsets={int(p): None if o is None else int(o) for p, o in data["offsets"].items()},
                saved_at=datetime.fromisoformat(data["saved_at"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{path} is not an offsets file written by replay ({exc})") from exc


def default_path(group_id: str, now: datetime | None = None) -> Path:
    """In the working directory, named so that two replays never overwrite each other."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return Path(f"replay-{group_id}-{stamp}.offsets.json")


def save(path: Path, saved: SavedOffsets) -> None:
    # Written before any offset moves: if this fails, nothing has changed.
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(saved.dump())
    temporary.replace(path)
