"""Alert channels as a rule file declares them, for tests that start their own receivers."""

from __future__ import annotations

from typing import Any


def email_channel(port: int, **extra: Any) -> dict[str, Any]:
    """Plain SMTP to a test's own server on 127.0.0.1."""
    return {
        "type": "email",
        "host": "127.0.0.1",
        "port": port,
        "starttls": False,
        "from": "alerts@callstream.test",
        "to": ["ops@callstream.test"],
        **extra,
    }
