"""The foundation every other package of callstream stands on, importing none of them:
Kafka settings and clients, settings parsing and secrets, the webhook signature, logging,
the small ops server, and the version."""

__version__ = "0.1.0"
