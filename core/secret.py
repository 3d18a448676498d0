"""A string that never prints: settings hold secrets in this type so that a logged or
repr'd settings object cannot leak them."""

from __future__ import annotations

from typing import Final


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value: Final = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


def secrets_from(raw: str | None) -> tuple[Secret, ...]:
    """Comma-separated secrets (several at once while rotating), blanks dropped."""
    if not raw:
        return ()
    return tuple(Secret(part.strip()) for part in raw.split(",") if part.strip())
