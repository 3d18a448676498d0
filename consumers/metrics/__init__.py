"""The metrics consumer, and what the registry and the tests use of it."""

from consumers.metrics.config_file import MetricsConfigError
from consumers.metrics.consumer import MetricsConsumer, build
from consumers.metrics.settings import MetricsSettings

__all__ = ["MetricsConfigError", "MetricsConsumer", "MetricsSettings", "build"]
