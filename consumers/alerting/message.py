"""What one alert says about its call: the template values and the webhook's JSON payload,
built from the report, with no links, no e-mail addresses, no full phone numbers, and free
text cut short.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Final

import orjson

from consumers.alerting.channels import AlertContext
from consumers.alerting.conditions import ReportView
from consumers.alerting.rule_file import Rule
from consumers.alerting.state import AlertKey
from core.logs import mask_phone
from schemas.report import CallReport

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


def _display(value: Any, limit: int = 80) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, str):
        return clip(privacy_safe(" ".join(value.split())), limit)
    return clip(privacy_safe(orjson.dumps(value).decode()), limit)


def _json_safe(value: Any, limit: int = 200) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    return _display(value, limit)


def build_context(
    key: AlertKey, rule: Rule, report: CallReport, *, excerpt_chars: int, summary_chars: int
) -> AlertContext:
    """Everything a channel may show about this call, already made safe."""
    view = ReportView(report)
    matched = {ref.text: view.lookup(ref) for ref in rule.condition.fields}
    summary = report.summary or report.analysis_summary or ""
    duration = report.duration_seconds
    values = {
        "rule": rule.name,
        "call_id": report.call_id,
        "event_time": report.event_time.isoformat().replace("+00:00", "Z"),
        "call_type": report.call_type or "-",
        "call_status": report.call_status or "-",
        "ended_reason": report.ended_reason or "-",
        "assistant_name": _display(report.assistant_name) if report.assistant_name else "-",
        "duration_seconds": "-" if duration is None else _display(round(duration, 1)),
        "from_number": mask_phone(report.from_number) or "withheld",
        "to_number": mask_phone(report.to_number) or "-",
        "success_evaluation": _display(report.success_evaluation),
        "summary": clip(privacy_safe(summary), summary_chars) or "-",
        "excerpt": clip(privacy_safe(report.transcript or ""), excerpt_chars) or "-",
        "matched": ", ".join(f"{name}={_display(value)}" for name, value in matched.items()) or "-",
        "condition": rule.condition.text,
    }
    payload = {
        "rule": rule.name,
        "call_id": report.call_id,
        "event_time": values["event_time"],
        "call_type": report.call_type,
        "ended_reason": report.ended_reason,
        "duration_seconds": duration,
        "from_number": mask_phone(report.from_number),
        "to_number": mask_phone(report.to_number),
        "success_evaluation": _json_safe(report.success_evaluation),
        "summary": values["summary"],
        "excerpt": values["excerpt"],
        "matched": {name: _json_safe(value) for name, value in matched.items()},
    }
    alert_id = hashlib.sha256("\x1f".join(key).encode()).hexdigest()[:32]
    return AlertContext(alert_id, values, payload)
