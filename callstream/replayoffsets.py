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
from typing import TextIO

import orjson
from aiokafka.errors import CommitFailedError

from callstream.consumerstatus import KafkaInspector
from core.kafkasettings import KafkaSettings
from core.offsets import commit_group_offsets

EXIT_OK = 0
EXIT_REFUSED = 2


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


async def restore_command(kafka: KafkaSettings, path: Path, out: TextIO, err: TextIO) -> int:
    """Commit the saved offsets back; refuses while the group has members."""
    saved = SavedOffsets.load(path)
    async with KafkaInspector(kafka) as inspector:
        group = await inspector.group(saved.group_id)
        if group.active:
            err.write(
                f"refusing to restore: group {saved.group_id} is active ({group.state},"
                f" {group.members} member(s)); stop its consumers first\n"
            )
            return EXIT_REFUSED
        partitions = sorted(saved.offsets)
        beginning, _ = await inspector.log_offsets(saved.topic, partitions)
    offsets = {p: beginning[p] if o is None else o for p, o in saved.offsets.items()}
    try:
        await commit_group_offsets(kafka, saved.group_id, saved.topic, offsets)
    except CommitFailedError:
        err.write(f"refusing to restore: group {saved.group_id} became active; nothing changed\n")
        return EXIT_REFUSED
    listing = ", ".join(f"{p}:{o}" for p, o in sorted(offsets.items()))
    out.write(
        f"restored group {saved.group_id} on {saved.topic} to the offsets saved at"
        f" {saved.saved_at.isoformat()} (partition:offset {listing})\n"
    )
    return EXIT_OK
