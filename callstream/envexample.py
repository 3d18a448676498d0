"""`.env.example`, generated from the settings declarations (`callstream settings
--env-example`), so that the file lists exactly what the code reads, with its defaults.

tests/e2e/test_deploy_static.py fails when the file in git differs from what this renders.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from dataclasses import dataclass

from callstream.commandsettings import LocalBrokerSettings, LogSettings
from consumers.catalog import CONSUMERS
from consumers.runner import RunnerSettings
from consumers.service import ServiceSettings, port_setting
from core.kafkasecurity import KafkaSecurity
from core.kafkasettings import KafkaSettings
from core.settings import Setting, declared
from ingress.settings import IngressSettings

_WIDTH = 96
_RULE = 94  # a section title's line of dashes
_HEADER = """\
# Every environment variable callstream reads, with its default. Copy to .env and edit.
#
# An empty value means "unset": the code then uses the default described in the comment.
# docker compose reads .env for the ${NAME:-default} values in docker-compose.yml, and
# `callstream run` reads it too (a variable set in the environment wins over the file);
# `callstream ingress` and `callstream consumer` read only the environment.
# Generated from the settings declarations: edit those, then run
# `callstream settings --env-example > .env.example` (tests/e2e/test_deploy_static.py checks it).
"""
# Read by the code but not callstream's own, or named by the operator's rule file: shown as
# documentation only.
_LOCAL_BROKER_NOTE = (
    "The local broker also honours JAVA_HOME (the JDK to run it with; empty: java on PATH).",
    "JAVA_HOME=",
)
_ALERTING_NOTE = (
    "Channel secrets are read from the variables the rule file names (url_env, secret_env, "
    "password_env); examples/alert-rules.yaml uses these:",
    "CALLSTREAM_ALERT_SLACK_URL=",
    "CALLSTREAM_ALERT_CRM_SECRET=",
    "CALLSTREAM_ALERT_SMTP_PASSWORD=",
)


@dataclass(frozen=True, slots=True)
class Section:
    title: str
    settings: tuple[Setting, ...]
    note: tuple[str, ...] = ()


def _of(*classes: type) -> tuple[Setting, ...]:
    return tuple(s for cls in classes for s in declared(cls).values())


def sections() -> list[Section]:
    """Every variable callstream reads, grouped by who reads it."""
    return [
        Section("every service", _of(KafkaSettings, LogSettings)),
        Section(
            "Kafka security (docs/kafka.md: managed services, clusters, ACLs)",
            _of(KafkaSecurity),
        ),
        Section(
            "local broker (`callstream run`, `callstream kafka start`)",
            _of(LocalBrokerSettings),
            _LOCAL_BROKER_NOTE,
        ),
        Section("ingress (`callstream ingress`)", _of(IngressSettings)),
        Section(
            "every consumer (`callstream consumer NAME`)", _of(ServiceSettings, RunnerSettings)
        ),
        *(
            Section(
                f"{name} consumer",
                (port_setting(name), *(_of(spec.settings) if spec.settings else ())),
                _ALERTING_NOTE if name == "alerting" else (),
            )
            for name, spec in CONSUMERS.items()
        ),
    ]


def all_settings() -> list[Setting]:
    return [s for section in sections() for s in section.settings]


def _comment(text: str) -> list[str]:
    return textwrap.wrap(
        text, _WIDTH, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False
    )


def _section(section: Section) -> Iterable[str]:
    yield ""
    yield f"# -- {section.title} ".ljust(_RULE, "-")
    yield ""
    for decl in section.settings:
        yield from _comment(decl.doc)
        yield f"{decl.env}={decl.example()}"
    if section.note:
        yield from _comment(section.note[0])
        yield from (f"# {line}" for line in section.note[1:])


def render() -> str:
    lines = [_HEADER.rstrip("\n")]
    for section in sections():
        lines.extend(_section(section))
    return "\n".join(lines) + "\n"
