"""What call content may appear in an alert: no links, no e-mail addresses, no full phone
numbers, and free text cut short."""

from __future__ import annotations

import re
from typing import Final

from core.logs import mask_phone

_URL = re.compile(
    r"""\b(?:[a-z][a-z0-9+.-]*://|www\.)[^\s<>"']+"""  # scheme:// or www.
    r"""|\b(?:[a-z0-9-]+\.)+[a-z]{2,}/[^\s<>"']*"""  # host.tld/path without a scheme
    # A bare host name, which chat clients turn into a link. Only common TLDs: matching any
    # "word.word" would eat sentences typed without a space after the full stop.
    r"""|\b(?:[a-z0-9-]+\.)+(?:com|net|org|nl|be|de|eu|io|co|uk|info|app|dev|ai|me)\b""",
    re.IGNORECASE,
)
_EMAIL_ADDRESS = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# A run of digits with the separators people speak or type numbers with. Eight digits is
# the shortest number worth masking (local numbers); shorter runs are amounts and scores.
_PHONE = re.compile(r"(?<![\w+])\+?\d[\d ()./-]{6,}\d")
_MIN_PHONE_DIGITS: Final = 8


def _mask_number(match: re.Match[str]) -> str:
    text = match.group()
    if sum(c.isdigit() for c in text) < _MIN_PHONE_DIGITS:
        return text
    return mask_phone(text) or ""


def privacy_safe(text: str) -> str:
    """No links, no e-mail addresses, no full phone numbers."""
    # Addresses first: their domain part would otherwise become "[link]" and leave the name.
    text = _EMAIL_ADDRESS.sub("[e-mail]", text)
    text = _URL.sub("[link]", text)
    return _PHONE.sub(_mask_number, text)


def clip(text: str, limit: int) -> str:
    """At most `limit` characters, cut at a word boundary when one is near."""
    text = text.strip()
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space > limit * 0.8:
        cut = cut[:space]
    return cut.rstrip() + "…"
