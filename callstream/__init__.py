"""callstream: the command and the operator's tools (replay, dlq, erase, bench, the local
broker), on top of the ingress and the consumers."""

from core import __version__

__all__ = ["__version__"]
