"""callstream: Flireo end-of-call reports through Kafka. Shared plumbing and the CLI."""

__version__ = "0.1.0"
