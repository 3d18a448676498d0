"""For Hypothesis tests that draw in a worker thread while the test's event loop serves the
ingress in the main thread."""

from __future__ import annotations

import pytest

# The ingress's Kafka client picks a broker with the global `random` (a metadata refresh).
# If that happens during a draw in the other thread, Hypothesis sees the global random state
# change and warns about random in strategies, which none of these strategies uses.
RANDOM_USED_BY_ANOTHER_THREAD = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)
