"""The pipeline against the Kafka that users run: a three-node cluster with TLS (its own
CA) and SCRAM passwords, as managed services have.

The end-to-end path (send, topic, storage, alerts, metrics), replay, the dead-letter
re-drive, the quarantine's reprocess and tail run here exactly as their own tests run them
against the plain session broker: this module points the `kafka` fixture at the secured
cluster and collects those tests again. A wrong password and an untrusted CA are each one
line naming the setting.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from dataclasses import replace

import pytest

from callstream.localcluster import LocalCluster
from core.kafkasecurity import KafkaSecurity
from core.kafkasettings import KafkaSettings
from core.secret import Secret
from core.settings import to_env
from tests.e2e.test_pipeline_e2e import (
    test_run_pipeline_stores_alerts_and_counts_a_report_once as test_pipeline_over_sasl_ssl,
)
from tests.integration.test_dlq import (
    test_redrive_sends_dead_letters_back_to_their_consumer_only as test_redrive_over_sasl_ssl,
)
from tests.integration.test_rejected_cli import (
    test_reprocess_publishes_once_what_a_changed_normaliser_passes as test_reprocess_over_sasl_ssl,
)
from tests.integration.test_replay import (
    test_replay_through_storage_leaves_row_count_unchanged as test_replay_over_sasl_ssl,
)
from tests.support.cli import run_cli
from tests.support.cluster import cluster_topics, local_cluster
from tests.support.produce import produce_reports, sample_report
from tests.support.topics import read_all

pytestmark = pytest.mark.slow

__all__ = [
    "test_pipeline_over_sasl_ssl",
    "test_redrive_over_sasl_ssl",
    "test_replay_over_sasl_ssl",
    "test_reprocess_over_sasl_ssl",
]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with local_cluster(tmp_path_factory.mktemp("secured") / "cluster", "sasl_ssl") as cluster:
        yield cluster


@pytest.fixture
def kafka(secured: LocalCluster) -> KafkaSettings:
    """Every test of this module, the collected ones too, talks to the secured cluster."""
    return cluster_topics(secured, "secured")


def _cli_env(kafka: KafkaSettings) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSTREAM_", "KAFKA_"))}
    return base | to_env(kafka) | {"CALLSTREAM_LOG_LEVEL": "WARNING"}


async def test_tail_over_sasl_ssl(kafka: KafkaSettings) -> None:
    assert kafka.security.protocol == "SASL_SSL"
    [call_id] = await produce_reports(kafka, [sample_report()])
    done = await asyncio.to_thread(run_cli, "tail", "--follow", "--max", "1", env=_cli_env(kafka))
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    assert json.loads(line)["record"]["call_id"] == call_id


def _with(kafka: KafkaSettings, **security: object) -> KafkaSettings:
    fields = {name: getattr(kafka.security, name) for name in KafkaSecurity.__dataclass_fields__}
    return replace(kafka, security=KafkaSecurity(**fields | security))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"sasl_password": Secret("not-the-password")}, "KAFKA_SASL_PASSWORD"),
        ({"ssl_cafile": None}, "KAFKA_SSL_CAFILE"),
    ],
    ids=["wrong password", "untrusted CA"],
)
@pytest.mark.parametrize("command", [("tail", "--max", "1"), ("consumers",), ("ingress",)])
async def test_a_refused_connection_is_one_line_naming_the_setting(
    kafka: KafkaSettings, change: dict[str, object], named: str, command: tuple[str, ...]
) -> None:
    done = await asyncio.to_thread(
        run_cli, *command, env=_cli_env(_with(kafka, **change)), timeout=60
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert named in lines[0]
    assert "Traceback" not in done.stderr
    assert "not-the-password" not in done.stderr


async def test_mutual_tls_with_a_client_certificate_and_without_one(
    secured: LocalCluster, kafka: KafkaSettings
) -> None:
    """The cluster's MTLS listener takes clients by their certificate alone: with one, a
    report goes there and back; without one, the refusal is one line naming the setting."""
    with_cert = replace(
        kafka, bootstrap_servers=secured.mtls_bootstrap, security=secured.mtls_security()
    )
    [call_id] = await produce_reports(with_cert, [sample_report()])
    [landed] = await read_all(with_cert, with_cert.topic)
    assert landed.raw.key == call_id.encode()

    without = _with(with_cert, ssl_certfile=None, ssl_keyfile=None)
    done = await asyncio.to_thread(run_cli, "tail", "--max", "1", env=_cli_env(without), timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "KAFKA_SSL_CERTFILE" in done.stderr
    assert "Traceback" not in done.stderr
