"""`callstream kafka`: a local Kafka for development and tests, one KRaft broker or a cluster
(`--brokers 3`), plaintext or secured, started from the Maven jars as processes."""

from __future__ import annotations

import argparse
import asyncio
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from callstream.clihelp import command
from callstream.localcluster import SECURITY_CHOICES, LocalCluster, is_cluster_home
from callstream.localkafka import LocalKafka, default_home
from core.kafkasettings import BOOTSTRAP, KafkaSettings
from core.settings import field_from_env
from core.topicadmin import describe


def add_parser(sub: Any) -> argparse.ArgumentParser:
    kafka = command(
        sub,
        "kafka",
        "a local Kafka: one KRaft broker, or a cluster (--brokers 3), plaintext or secured",
        "callstream kafka start",
        "callstream kafka start --brokers 3 --security sasl_ssl",
        'eval "$(callstream kafka env)"     # point this shell at it',
        "callstream kafka stop --node 2      # then `start --node 2`: a failure by hand",
    )
    kafka.add_argument(
        "action", choices=["start", "stop", "status", "env"], help="what to do with it"
    )
    kafka.add_argument(
        "--brokers", type=int, help="start a cluster of this many nodes (3 for replication)"
    )
    kafka.add_argument(
        "--security",
        choices=SECURITY_CHOICES,
        help="sasl_ssl: TLS with the cluster's own CA and SCRAM users, as managed Kafka has",
    )
    kafka.add_argument("--node", type=int, help="start or stop only this node of the cluster")
    kafka.set_defaults(func=run)
    return kafka


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    home = default_home() / "cluster"
    wants_cluster = (args.brokers or 1) > 1 or args.security == "sasl_ssl"
    if wants_cluster and args.action == "start":
        cluster = LocalCluster(home, args.brokers or 1, args.security or "plaintext")
    elif is_cluster_home(home) and (wants_cluster or _cluster_running(home)):
        cluster = LocalCluster.existing(home)
    elif args.node is not None:
        raise SystemExit("--node is for a cluster (`callstream kafka start --brokers 3`)")
    else:
        return _single_broker(args.action, LocalKafka(default_home()))
    if args.action == "start":
        if args.node is None:
            print(cluster.start())
        else:
            cluster.start_node(args.node)
            print(f"node {args.node} started")
    elif args.action == "stop":
        if args.node is None:
            cluster.stop()
        else:
            cluster.stop_node(args.node)
        print("stopped")
    elif args.action == "env":
        _print_env(cluster.env())
    else:
        return _cluster_status(cluster, env)
    return 0


def _cluster_running(home: Path) -> bool:
    return any(s is not None and s.running for _, s in LocalCluster.existing(home).status())


def _single_broker(action: str, broker: LocalKafka) -> int:
    if action == "start":
        print(broker.start())
        return 0
    if action == "stop":
        broker.stop()
        print("stopped")
        return 0
    status = broker.status()
    if status is None or not status.running:
        print("not running")
        return 1
    if action == "env":
        _print_env({BOOTSTRAP.env: broker.bootstrap})
    else:
        print(f"running pid={status.pid} bootstrap={status.bootstrap} data={status.data_dir}")
    return 0


def _print_env(values: Mapping[str, str]) -> None:
    """Lines for `eval "$(callstream kafka env)"`."""
    for name, value in values.items():
        print(f"export {name}={shlex.quote(value)}")


def _cluster_status(cluster: LocalCluster, env: Mapping[str, str]) -> int:
    states = cluster.status()
    pids = {number: state.pid for number, state in states if state is not None and state.running}
    for number, _ in states:
        print(f"node {number}: " + (f"running pid={pids[number]}" if number in pids else "stopped"))
    if not pids:
        return 1
    topic = field_from_env(KafkaSettings, "topic", env)
    kafka = KafkaSettings(cluster.bootstrap, topic=topic, security=cluster.security())
    names = [kafka.topic, kafka.events_topic, kafka.dlq_topic, kafka.rejected_topic]
    view = asyncio.run(describe(kafka, names))
    print(f"brokers in the cluster: {view.brokers}; active controller: node {view.controller}")
    for topic in view.topics:
        print(
            f"{topic.topic}: replication factor {topic.replication_factor},"
            f" min.insync.replicas {topic.min_insync_replicas},"
            f" under-replicated partitions {topic.under_replicated}"
        )
    return 0
