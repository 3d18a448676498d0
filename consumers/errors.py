"""How a consumer tells the runner what went wrong.

* `RetryableError`: the world is not ready (database down, alert target timing out).
  The runner pauses, backs off and retries the same batch; nothing is committed meanwhile.
* `PermanentError`: this record can never be handled (the database refuses its content).
  The runner sends it to the dead-letter topic and goes on.

Any other exception is treated as permanent for the record(s) that raise it, after the
runner has isolated them from the rest of the batch.
"""

from __future__ import annotations


class RetryableError(Exception):
    pass


class PermanentError(Exception):
    pass


class ConsumerRegistryError(Exception):
    """A consumer name that is unknown, taken twice, or registered with something that is
    not a ConsumerSpec: the operator's to fix, said in one line."""
