"""Walking parsed JSON in tests."""

from __future__ import annotations

from typing import Any


def objects(value: Any) -> list[dict[str, Any]]:
    """Every JSON object inside `value`, itself included."""
    found: list[dict[str, Any]] = []
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            found.append(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found
