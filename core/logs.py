"""Structured (JSON lines) logging, and the masks that keep personal data out of it."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

from core.settings import SettingsError

_RESERVED = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class CoordinatorWait(logging.Filter):
    """aiokafka logs an ERROR for every failed group-coordinator lookup, several a second,
    and a WARNING each time it drops a coordinator that is not ready, while a fresh broker
    creates its offsets topic: normal start-up, not a fault. The first failed lookup of a
    burst becomes one INFO line, "waiting for the group coordinator"; the rest of the burst
    (until `quiet` seconds pass without either) is dropped. A coordinator dropped outside a
    burst (a broker that went away) stays a warning."""

    LOGGER = "aiokafka.consumer.group_coordinator"
    MESSAGE = "Group Coordinator Request failed: %s"
    DEAD = "Marking the coordinator dead (node %s)for group %s."

    def __init__(self, quiet: float = 60.0) -> None:
        super().__init__()
        self._quiet = quiet
        self._last: float | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != self.LOGGER or record.msg not in (self.MESSAGE, self.DEAD):
            return True
        now = time.monotonic()
        burst = self._last is not None and now - self._last < self._quiet
        if record.msg == self.DEAD:
            if burst:
                self._last = now
            return not burst
        error = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if not getattr(error, "retriable", False):
            return True  # a refusal that will not heal by waiting stays an error
        self._last = now
        if burst or not logging.getLogger().isEnabledFor(logging.INFO):
            return False
        record.name = "callstream.kafka"
        record.msg, record.args = "waiting for the group coordinator", ()
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info = record.exc_text = None
        return True


class MissingTopic(logging.Filter):
    """aiokafka logs an ERROR on every metadata refresh while a topic it was asked about is
    not in the cluster's metadata, which is also the case for a second or two after another
    service created it (a fresh broker's first `callstream run`). Each topic's first such
    record becomes one WARNING that says what is going on; repeats within `quiet` seconds
    are dropped, so a topic that never appears is still named once a minute."""

    LOGGER = "aiokafka.cluster"
    MESSAGE = "Topic %s not found in cluster metadata"

    def __init__(self, quiet: float = 60.0) -> None:
        super().__init__()
        self._quiet = quiet
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != self.LOGGER or record.msg != self.MESSAGE:
            return True
        topic = str(record.args[0]) if isinstance(record.args, tuple) and record.args else "?"
        now = time.monotonic()
        last = self._last.get(topic)
        if last is not None and now - last < self._quiet:
            return False
        self._last[topic] = now
        record.name = "callstream.kafka"
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = "topic %s is not in the cluster's metadata (yet): waiting for it to be created"
        return True


def configure(level: str = "INFO", *, service: str) -> None:
    if level.upper() not in logging.getLevelNamesMapping():
        raise SettingsError(
            f"CALLSTREAM_LOG_LEVEL={level!r} is not a log level: DEBUG, INFO, WARNING or ERROR"
        )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(CoordinatorWait())
    handler.addFilter(MissingTopic())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiokafka logs every reconnect attempt at INFO/ERROR with full tracebacks.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
    # Services say what they serve once they listen; this line only says a command ran,
    # which a person at a terminal already knows.
    logging.getLogger("callstream").debug("starting %s", service)


def mask_phone(number: str | None) -> str | None:
    """Country code and last two digits: enough to tell calls apart in a log, not to dial."""
    if not number:
        return number
    digits = [c for c in number if c.isdigit()]
    if len(digits) <= 4:
        return "*" * len(number)
    prefix = "+" if number.startswith("+") else ""
    return f"{prefix}{''.join(digits[:2])}{'*' * (len(digits) - 4)}{''.join(digits[-2:])}"


class Throttled:
    """A warning or error that can fire on every request under load, logged at most once per
    `interval` seconds with a count of the ones held back, so a fault stays visible
    without flooding the log."""

    def __init__(self, logger: logging.Logger, interval: float = 5.0) -> None:
        self._logger = logger
        self._interval = interval
        self._next = 0.0
        self._held = 0

    def warning(self, msg: str, *args: object) -> None:
        self._log(logging.WARNING, msg, args)

    def error(self, msg: str, *args: object) -> None:
        self._log(logging.ERROR, msg, args)

    def _log(self, level: int, msg: str, args: tuple[object, ...]) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        held, self._held, self._next = self._held, 0, now + self._interval
        self._logger.log(level, msg, *args, extra={"held_back": held} if held else None)
