"""`callstream run` reads ./.env as docker compose does, so one file configures both."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from dotenv import dotenv_values

from core.settings import SettingsError


def with_env_file(env: Mapping[str, str], path: Path = Path(".env")) -> dict[str, str]:
    """`env` over the file's variables: what is set in the environment wins, as with compose.

    No file: `env` unchanged. A variable the file names without a value (`KEY` alone) is
    left out rather than set empty.
    """
    if not path.is_file():
        return dict(env)
    try:
        found = dotenv_values(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read {path}: {exc}") from exc
    return {k: v for k, v in found.items() if v is not None} | dict(env)
