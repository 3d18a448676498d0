"""Local Kafka clusters for the tests that need replication or security: three KRaft nodes
on loopback from the same jars as the session broker (callstream.localcluster)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

from callstream.localcluster import LocalCluster, Security
from core.kafkasettings import KafkaSettings

START_TIMEOUT = 180.0


@contextlib.contextmanager
def local_cluster(home: Path, security: Security = "plaintext") -> Iterator[LocalCluster]:
    cluster = LocalCluster(home, brokers=3, security=security)
    cluster.start(timeout=START_TIMEOUT)
    try:
        yield cluster
    finally:
        cluster.stop()


def cluster_topics(cluster: LocalCluster, prefix: str) -> KafkaSettings:
    """Settings for topics of one test's own on `cluster`, secured as the cluster is."""
    suffix = uuid.uuid4().hex[:12]
    return KafkaSettings(
        bootstrap_servers=cluster.bootstrap,
        topic=f"{prefix}.{suffix}.end-of-call-report",
        events_topic=f"{prefix}.{suffix}.events",
        security=cluster.security(),
    )
