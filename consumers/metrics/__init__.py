"""The metrics consumer: business metrics about calls, each call counted once, ever.

What the rest of callstream (the registry, the tests) uses is exported here.
"""

from consumers.metrics.config_file import MetricsConfigError
from consumers.metrics.consumer import MetricsConsumer, build
from consumers.metrics.settings import MetricsSettings

__all__ = ["MetricsConfigError", "MetricsConsumer", "MetricsSettings", "build"]
