"""Settings of the command itself rather than of a service: the log level every command
uses, and where the local broker (`callstream run`, `callstream kafka start`) lives."""

from __future__ import annotations

from pathlib import Path

from core.settings import EnvSettings, setting, settings_class


@settings_class
class LogSettings(EnvSettings):
    level: str = setting(
        "CALLSTREAM_LOG_LEVEL", default="INFO", doc="Log level: DEBUG, INFO, WARNING, ERROR."
    )


@settings_class
class LocalBrokerSettings(EnvSettings):
    # None: resolved when used (the working directory and home can change in tests).
    home: Path | None = setting(
        "CALLSTREAM_HOME",
        default=None,
        doc="Where the local broker keeps its config, data and logs. Empty: ./.callstream",
    )
    cache_dir: Path | None = setting(
        "CALLSTREAM_CACHE_DIR",
        default=None,
        doc="Where the Kafka jars downloaded with Maven are cached. Empty: ~/.cache/callstream",
    )
    heap_opts: str = setting(
        "CALLSTREAM_KAFKA_HEAP_OPTS",
        default="-Xms256m -Xmx512m",
        doc="JVM heap options for the local broker.",
    )
