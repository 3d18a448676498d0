"""A local Kafka cluster of several KRaft nodes, plaintext or secured with TLS and SCRAM.

Production Kafka is replicated and secured; a pipeline only ever tried against one plain
broker has not met it. `callstream kafka start --brokers 3 --security sasl_ssl` starts
this, on loopback, from the same Maven jars as the single broker: every node is a combined
broker and controller (a `LocalKafka` home of its own under the cluster's home), topics get
three replicas with min.insync.replicas 2, and with `sasl_ssl` clients must present a SCRAM
password and trust the cluster's own CA, as with a managed service.

Layout of a cluster home::

    cluster.json     node count, security, ports, cluster id, the SCRAM password (0600)
    tls/             the CA clients trust (ca.pem) and the brokers' keystore (sasl_ssl)
    node-1/ ...      each node's LocalKafka home
"""

from __future__ import annotations

import json
import secrets
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from callstream.kafkajars import LocalKafkaError
from callstream.localkafka import BrokerStatus, LocalKafka, atomic_write, new_cluster_id
from callstream.localtls import ensure_tls_files
from callstream.ports import free_ports
from core.kafkasecurity import KafkaSecurity
from core.secret import Secret

Security = Literal["plaintext", "sasl_ssl"]
SECURITY_CHOICES: tuple[Security, ...] = ("plaintext", "sasl_ssl")
USER = "callstream"
MECHANISM: Final = "SCRAM-SHA-512"
_HOST = "127.0.0.1"
_SCRAM_LOGIN = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
_PLAIN_LOGIN = "org.apache.kafka.common.security.plain.PlainLoginModule required"


@dataclass(frozen=True)
class Layout:
    brokers: int
    security: Security
    cluster_id: str
    # Per node: the plaintext listener nodes replicate over (and readiness is probed on),
    # the listener clients use (the same one when plaintext), the controller listener.
    internal_ports: list[int]
    client_ports: list[int]
    controller_ports: list[int]
    password: str
    # sasl_ssl clusters also take clients by mutual TLS (a client certificate, no SASL).
    mtls_ports: list[int] = field(default_factory=list)

    @property
    def replication_factor(self) -> int:
        return min(3, self.brokers)

    @property
    def min_insync_replicas(self) -> int:
        # One replica may be lost without refusing writes; with a single one there is none.
        return max(1, self.replication_factor - 1)


def is_cluster_home(home: Path) -> bool:
    return (home / "cluster.json").is_file()


class LocalCluster:
    """Cheap handle on a cluster home, as LocalKafka is on a broker home."""

    def __init__(self, home: Path, brokers: int = 3, security: Security = "plaintext") -> None:
        if brokers < 1:
            raise LocalKafkaError("a cluster needs at least one broker")
        self.home = Path(home).absolute()
        self.state_file = self.home / "cluster.json"
        self.tls_dir = self.home / "tls"
        self._wanted = (brokers, security)

    @classmethod
    def existing(cls, home: Path) -> LocalCluster:
        """The cluster laid out in `home` before, whatever its size and security."""
        layout = Layout(**json.loads((home / "cluster.json").read_text()))
        return cls(home, layout.brokers, layout.security)

    def layout(self) -> Layout:
        """The cluster's layout, made on first use and kept: clients remember its ports."""
        if self.state_file.is_file():
            layout = Layout(**json.loads(self.state_file.read_text()))
            if (layout.brokers, layout.security) != self._wanted:
                raise LocalKafkaError(
                    f"{self.home} holds a {layout.brokers}-node {layout.security} cluster; stop"
                    " it and remove the directory to make another"
                )
            return layout
        brokers, security = self._wanted
        ports = free_ports(4 * brokers)
        client = ports[:brokers] if security == "plaintext" else ports[brokers : 2 * brokers]
        layout = Layout(
            brokers=brokers,
            security=security,
            cluster_id=new_cluster_id(),
            internal_ports=ports[:brokers],
            client_ports=client,
            controller_ports=ports[2 * brokers : 3 * brokers],
            password=secrets.token_urlsafe(18),
            mtls_ports=[] if security == "plaintext" else ports[3 * brokers :],
        )
        atomic_write(self.state_file, json.dumps(asdict(layout), indent=2) + "\n")
        return layout

    @property
    def bootstrap(self) -> str:
        return ",".join(f"{_HOST}:{port}" for port in self.layout().client_ports)

    @property
    def mtls_bootstrap(self) -> str:
        return ",".join(f"{_HOST}:{port}" for port in self.layout().mtls_ports)

    def mtls_security(self) -> KafkaSecurity:
        """A client that authenticates with its certificate (the cluster's CA signed it)."""
        files = ensure_tls_files(self.tls_dir)
        return KafkaSecurity(
            protocol="SSL",
            ssl_cafile=files.ca_cert,
            ssl_certfile=files.client_cert,
            ssl_keyfile=files.client_key,
        )

    def security(self) -> KafkaSecurity:
        layout = self.layout()
        if layout.security == "plaintext":
            return KafkaSecurity()
        return KafkaSecurity(
            protocol="SASL_SSL",
            sasl_mechanism=MECHANISM,
            sasl_username=USER,
            sasl_password=Secret(layout.password),
            ssl_cafile=self.tls_dir / "ca.pem",
        )

    def env(self) -> dict[str, str]:
        security = self.security()
        env = {"KAFKA_BOOTSTRAP_SERVERS": self.bootstrap}
        if security.protocol != "PLAINTEXT":
            assert security.sasl_password is not None
            env |= {
                "KAFKA_SECURITY_PROTOCOL": security.protocol,
                "KAFKA_SASL_MECHANISM": MECHANISM,
                "KAFKA_SASL_USERNAME": USER,
                "KAFKA_SASL_PASSWORD": security.sasl_password.reveal(),
                "KAFKA_SSL_CAFILE": str(security.ssl_cafile),
            }
        return env

    def nodes(self) -> list[LocalKafka]:
        layout = self.layout()
        return [self._node(layout, n) for n in range(1, layout.brokers + 1)]

    def node(self, number: int) -> LocalKafka:
        layout = self.layout()
        if not 1 <= number <= layout.brokers:
            raise LocalKafkaError(f"the cluster has nodes 1 to {layout.brokers}, not {number}")
        return self._node(layout, number)

    def start(self, timeout: float = 120.0) -> str:
        """Start every node not running; return the client bootstrap. Nodes start side by
        side: none is ready until a majority of controllers has formed a quorum."""
        layout = self.layout()
        if layout.security == "sasl_ssl":
            ensure_tls_files(self.tls_dir)
        # Leaving the block waits for every node, so a failure is raised after all have tried.
        with ThreadPoolExecutor(max_workers=layout.brokers) as pool:
            for started in [pool.submit(node.start, timeout) for node in self.nodes()]:
                started.result()
        return self.bootstrap

    def start_node(self, number: int, timeout: float = 120.0) -> None:
        self.node(number).start(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        for node in self.nodes():
            node.stop(timeout)

    def stop_node(self, number: int, timeout: float = 30.0) -> None:
        self.node(number).stop(timeout)

    def kill_node(self, number: int, sig: int = signal.SIGKILL) -> None:
        self.node(number).kill(sig)

    def status(self) -> list[tuple[int, BrokerStatus | None]]:
        return [(n, node.status()) for n, node in enumerate(self.nodes(), start=1)]

    # -- one node's configuration ------------------------------------------------------------

    def _node(self, layout: Layout, number: int) -> LocalKafka:
        i = number - 1
        internal, client = layout.internal_ports[i], layout.client_ports[i]
        controller = layout.controller_ports[i]
        home = self.home / f"node-{number}"
        self._seed_state(home, layout, number)
        voters = ",".join(
            f"{n + 1}@{_HOST}:{port}" for n, port in enumerate(layout.controller_ports)
        )
        replicas, min_isr = str(layout.replication_factor), str(layout.min_insync_replicas)
        config: dict[str, str] = {
            "controller.quorum.voters": voters,
            "default.replication.factor": replicas,
            "offsets.topic.replication.factor": replicas,
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min_isr,
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min_isr,
            "min.insync.replicas": min_isr,
        }
        format_args: list[str] = []
        if layout.security == "sasl_ssl":
            ports = (internal, client, layout.mtls_ports[i], controller)
            config |= _sasl_ssl_config(self.tls_dir, layout.password, *ports)
            for mechanism in ("SCRAM-SHA-512", "SCRAM-SHA-256"):
                format_args += [
                    "--add-scram",
                    f"{mechanism}=[name={USER},password={layout.password}]",
                ]
        return LocalKafka(
            home,
            port=internal,
            controller_port=controller,
            extra_config=config,
            node_id=number,
            format_args=format_args,
        )

    def _seed_state(self, home: Path, layout: Layout, number: int) -> None:
        # Every node must format its storage with the same cluster id.
        state_file = home / "broker.json"
        if state_file.is_file():
            return
        seed: dict[str, Any] = {"cluster_id": layout.cluster_id, "node_id": number}
        atomic_write(state_file, json.dumps(seed) + "\n")


def _sasl_ssl_config(
    tls: Path, password: str, internal: int, client: int, mtls: int, controller: int
) -> dict[str, str]:
    """Clients on SASL_SSL (SCRAM, and PLAIN for services that only offer it) or on mutual
    TLS; the nodes among themselves and the readiness probe on a plaintext listener of
    loopback."""
    return {
        "listeners": (
            f"PLAINTEXT://{_HOST}:{internal},SASL_SSL://{_HOST}:{client},"
            f"MTLS://{_HOST}:{mtls},CONTROLLER://{_HOST}:{controller}"
        ),
        "advertised.listeners": (
            f"PLAINTEXT://{_HOST}:{internal},SASL_SSL://{_HOST}:{client},MTLS://{_HOST}:{mtls}"
        ),
        "listener.security.protocol.map": (
            "PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,MTLS:SSL,CONTROLLER:PLAINTEXT"
        ),
        "listener.name.mtls.ssl.client.auth": "required",
        "sasl.enabled.mechanisms": "SCRAM-SHA-512,SCRAM-SHA-256,PLAIN",
        # PLAIN for the services that offer nothing else (Confluent Cloud's API keys).
        "listener.name.sasl_ssl.plain.sasl.jaas.config": (
            f'{_PLAIN_LOGIN} user_{USER}="{password}";'
        ),
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": _SCRAM_LOGIN,
        "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config": _SCRAM_LOGIN,
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(tls / "broker-keystore.pem"),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(tls / "ca.pem"),
    }
