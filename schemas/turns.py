"""The transcript as typed turns (who spoke, what, and when where the sender says).

Turns are derived, never written back: the payload's own `messages` (or transcript text)
stays where it was, in a typed field or in extra_json, so the round trip does not depend on
this reading. That is also why nothing here refuses a report: a message that is not a
spoken turn (Vapi's system prompt, tool calls and results) or is malformed is left out.
"""

from __future__ import annotations

import re
from typing import Any

from schemas.converters import MAX_EVENT_TIME_MS, MIN_EVENT_TIME_MS, peek
from schemas.fieldmaps import SourceFormat

# One spoken turn, as transcript_turns_json holds it: role, text, start_ms, end_ms,
# seconds_from_start; JSON-ready as it is.
Turn = dict[str, Any]

# Speakers as the formats name them. Vapi says `bot` in its schema and `assistant` in its
# docs; Flireo's flat transcript says `AI:` and `Gebruiker:` (Dutch for user).
_ROLES = {
    "assistant": "assistant",
    "bot": "assistant",
    "ai": "assistant",
    "agent": "assistant",
    "user": "user",
    "customer": "user",
    "gebruiker": "user",
    "klant": "user",
    "caller": "user",
}
_LINE = re.compile(r"^\s*([A-Za-z]+)\s*:\s?(.*)$")


def transcript_turns(
    payload: dict[str, Any], source_format: SourceFormat, transcript: str | None
) -> list[Turn] | None:
    """The spoken turns, from the format's messages list, else from its transcript text;
    None when the payload has neither."""
    path = {
        "FLAT": None,
        "NESTED_CAMEL": ("message", "messages"),
        "NESTED_SNAKE": ("message", "messages"),
        "VAPI": ("message", "artifact", "messages"),
    }[source_format]
    messages = peek(payload, path) if path is not None else None
    if isinstance(messages, list):
        return [turn for turn in map(_from_message, messages) if turn is not None]
    if transcript is not None:
        return _from_text(transcript)
    return None


def _from_message(message: Any) -> Turn | None:
    if not isinstance(message, dict):
        return None
    role = _ROLES.get(str(message.get("role", "")).casefold())
    # Vapi: `message`; Flireo's SDK: `content`.
    text = message.get("message", message.get("content"))
    if role is None or not isinstance(text, str):
        return None
    return _turn(role, text) | {
        "start_ms": _epoch_ms(message.get("time")),
        "end_ms": _epoch_ms(message.get("endTime")),
        "seconds_from_start": _seconds(message.get("secondsFromStart")),
    }


def _from_text(transcript: str) -> list[Turn] | None:
    """`AI: ...` / `Gebruiker: ...` lines; a line without a known speaker continues the turn
    before it. None when no line names a speaker (the text is then not a dialogue)."""
    turns: list[Turn] = []
    for line in transcript.splitlines():
        match = _LINE.match(line)
        role = _ROLES.get(match.group(1).casefold()) if match else None
        if role is not None and match is not None:
            turns.append(_turn(role, match.group(2)))
        elif turns and line.strip():
            turns[-1]["text"] += "\n" + line
    return turns or None


def _turn(role: str, text: str) -> Turn:
    return {
        "role": role,
        "text": text,
        "start_ms": None,
        "end_ms": None,
        "seconds_from_start": None,
    }


def _epoch_ms(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    ms = int(value)
    return ms if MIN_EVENT_TIME_MS <= ms < MAX_EVENT_TIME_MS else None


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return float(value)
