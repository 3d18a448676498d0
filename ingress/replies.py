"""Answers to the events that expect one (assistant-request, tool-calls, ...), per format.

What each sender documents as the neutral answer (table: docs/payload-formats.md, "Events
that expect a reply"): nested Flireo takes `{}` as "use the saved agent"; flat Flireo and
Vapi have no neutral assistant-request answer (an empty one fails or ends the call), so
those get a 422 unless one is configured. Tool calls get the documented "this failed" shape
for each call, so the model hears that the tool is unavailable instead of waiting out the
deadline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import orjson
from aiohttp import web

from ingress.errors import Problem
from ingress.settings import IngressSettings
from schemas.normalise import Normalised
from schemas.requests import tool_calls

JsonObject = dict[str, Any]


class Replies:
    """The configured answers, parsed once at start-up."""

    def __init__(self, settings: IngressSettings) -> None:
        def parsed(text: str | None) -> JsonObject | None:
            return None if text is None else dict(orjson.loads(text))

        self._assistant: dict[str, tuple[JsonObject | None, str]] = {
            "FLAT": (
                parsed(settings.flat_assistant_request_reply),
                "CALLSTREAM_FLAT_ASSISTANT_REQUEST_REPLY",
            ),
            "VAPI": (
                parsed(settings.vapi_assistant_request_reply),
                "CALLSTREAM_VAPI_ASSISTANT_REQUEST_REPLY",
            ),
        }
        self._nested_assistant: JsonObject = dict(orjson.loads(settings.assistant_request_reply))
        self._transfer = parsed(settings.transfer_destination_reply)
        knowledge = parsed(settings.knowledge_base_reply)
        self._knowledge = {"documents": []} if knowledge is None else knowledge
        self._tool_text = settings.tool_call_reply
        self._answers: Final[dict[str, Callable[[Normalised, Any], JsonObject]]] = {
            "assistant-request": self._assistant_request,
            "tool-calls": self._tool_calls,
            "transfer-destination-request": self._transfer_destination,
            "knowledge-base-request": lambda event, payload: self._knowledge,
        }

    def answer(self, event: Normalised, payload: Any) -> web.Response:
        """200 with the answer's JSON body, or a Problem when there is none to give."""
        body = self._answers[event.event_type](event, payload)
        return web.Response(status=200, body=orjson.dumps(body), content_type="application/json")

    def _assistant_request(self, event: Normalised, payload: Any) -> JsonObject:
        if event.source_format not in self._assistant:
            return self._nested_assistant
        reply, variable = self._assistant[event.source_format]
        if reply is None:
            raise _no_answer(event, f"an assistant configuration (set {variable})")
        return reply

    def _tool_calls(self, event: Normalised, payload: Any) -> JsonObject:
        calls = tool_calls(payload, event.source_format)
        text = self._tool_text
        if event.source_format == "FLAT":
            # The flat docs document only `result`; a missing toolCallId breaks the workflow.
            return {"results": [{"toolCallId": call.id, "result": text} for call in calls]}
        if event.source_format == "VAPI":
            return {
                "results": [
                    {"toolCallId": call.id, "name": call.name or "", "error": text}
                    for call in calls
                ]
            }
        # Nested Flireo documents a per-call `result` but only a top-level `error`.
        return {"error": text}

    def _transfer_destination(self, event: Normalised, payload: Any) -> JsonObject:
        if self._transfer is None:
            raise _no_answer(event, "a destination (set CALLSTREAM_TRANSFER_DESTINATION_REPLY)")
        return self._transfer


def _no_answer(event: Normalised, needs: str) -> Problem:
    return Problem(
        422,
        "unsupported-event",
        "Event needs a reply callstream is not configured to give",
        f"{event.event_type} ({event.source_format}) has no neutral answer: it needs {needs}; "
        "the event was kept on the events topic",
        pointer="/eventType" if event.source_format == "FLAT" else "/message/type",
    )
