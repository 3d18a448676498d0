"""What a request-response event asks for, read from each format, so the ingress can answer
each tool call by its id (docs/payload-formats.md, "Events that expect a reply").

Nothing here refuses: a tool call without a usable id cannot be answered by id, so it is
left out of the answer, and the event itself is kept whole on the events topic anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.converters import MISSING, peek
from schemas.fieldmaps import SourceFormat


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str | None


def tool_calls(payload: Any, source_format: SourceFormat) -> list[ToolCall]:
    """The tool calls a tool-calls event asks for, in the order sent."""
    if source_format == "FLAT":
        # The flat docs call them tasks: {taskId, taskName, taskPayload?}.
        return _calls(peek(payload, ("tasksInitiated",)), "taskId", "taskName")
    key = "tool_call_list" if source_format == "NESTED_SNAKE" else "toolCallList"
    listed = peek(payload, ("message", key))
    if listed is MISSING and source_format == "VAPI":
        # Vapi requires both lists; toolWithToolCallList nests each call under `toolCall`.
        wrapped = peek(payload, ("message", "toolWithToolCallList"))
        if isinstance(wrapped, list):
            listed = [item.get("toolCall") for item in wrapped if isinstance(item, dict)]
    return _calls(listed, "id", "name")


def _calls(items: Any, id_key: str, name_key: str) -> list[ToolCall]:
    if not isinstance(items, list):
        return []
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get(id_key), str):
            continue
        # Vapi's schema and Flireo's nested docs: {id, function: {name}}; Vapi's own docs
        # example: {id, name, parameters}.
        name = peek(item, ("function", "name"))
        if not isinstance(name, str):
            name = item.get(name_key)
        out.append(ToolCall(item[id_key], name if isinstance(name, str) else None))
    return out
