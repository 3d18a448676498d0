"""The rule file: YAML that defines the channels and the rules that notify them.

A rule file is read once at start-up, and every problem in it is reported together, each
with its line (and column, inside a condition), so one edit-and-restart fixes them all.
Secrets never appear in the file: it names the environment variables that hold them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any, Final

import yaml
from yarl import URL

from consumers.alerting.channels import (
    CHANNEL_TYPES,
    DEFAULT_EMAIL_SUBJECT,
    DEFAULT_TEMPLATES,
    TEMPLATE_FIELDS,
    ChannelConfig,
    ChannelType,
    EmailChannel,
    RateLimit,
    SlackChannel,
    WebhookChannel,
)
from consumers.alerting.conditions import (
    All,
    AnyOf,
    Condition,
    ConditionError,
    Const,
    Expr,
    Not,
    ReportView,
    parse_condition,
)
from core.secret import Secret
from core.settings import SettingsError
from schemas.report import CallReport


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    condition: Condition
    channels: tuple[str, ...]
    line: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...] = ()
    channels: Mapping[str, ChannelConfig] = field(default_factory=dict)

    def matching(self, report: CallReport) -> list[Rule]:
        view = ReportView(report)
        return [rule for rule in self.rules if rule.condition.evaluate(view)]


class RuleFileError(SettingsError):
    """Everything wrong with a rule file, one `path:line: problem` per entry."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


# -- reading the YAML with line numbers ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Node:
    """A YAML value and the 1-based line it starts on."""

    value: Any  # dict[str, _Node] | list[_Node] | scalar
    line: int
    column: int = 1  # 1-based column where the scalar's text starts
    style: str | None = None
    multiline: bool = False


class _Problems:
    def __init__(self, path: Path) -> None:
        self._path = path
        self.items: list[str] = []

    def add(self, line: int, message: str, column: int | None = None) -> None:
        where = f"{self._path}:{line}" + (f":{column}" if column is not None else "")
        self.items.append(f"{where}: {message}")


def _compose(text: str, problems: _Problems) -> _Node | None:
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        return None if root is None else _convert(root, loader, problems)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problems.add(mark.line + 1 if mark else 1, f"not valid YAML: {exc.problem or exc}")
        return None
    except yaml.YAMLError as exc:  # e.g. a control character: no mark, still the file's fault
        problems.add(1, f"not valid YAML: {exc}")
        return None
    finally:
        loader.dispose()


def _convert(node: yaml.Node, loader: yaml.SafeLoader, problems: _Problems) -> _Node:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[str, _Node] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                problems.add(key_node.start_mark.line + 1, f"keys must be strings, not {key!r}")
                continue
            if key in out:
                problems.add(key_node.start_mark.line + 1, f"{key!r} appears twice")
            out[key] = _convert(value_node, loader, problems)
        return _Node(out, line)
    if isinstance(node, yaml.SequenceNode):
        return _Node([_convert(item, loader, problems) for item in node.value], line)
    assert isinstance(node, yaml.ScalarNode)
    return _Node(
        loader.construct_object(node, deep=True),
        line,
        node.start_mark.column + 1,
        node.style,
        node.start_mark.line != node.end_mark.line or node.style in ("|", ">"),
    )


# -- validating the file ---------------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_EMAIL = re.compile(r"^[^@\s<>]+@[^@\s<>]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOP_KEYS: Final = frozenset({"channels", "rules"})
_RULE_KEYS: Final = frozenset({"name", "description", "when", "channels", "enabled"})
_COMMON_KEYS: Final = frozenset({"type", "template", "rate"})
_CHANNEL_KEYS: Final[Mapping[str, frozenset[str]]] = {
    "slack": _COMMON_KEYS | {"url", "url_env"},
    "webhook": _COMMON_KEYS | {"url", "url_env", "secret_env"},
    "email": _COMMON_KEYS
    | {"host", "port", "tls", "starttls", "from", "to", "username", "password_env", "subject"},
}
_SECRET_HINTS: Final = {
    "secret": "secrets come from the environment: name the variable in `secret_env`",
    "password": "secrets come from the environment: name the variable in `password_env`",
}


def load_rule_file(path: Path, env: Mapping[str, str]) -> RuleSet:
    """Read and validate a rule file; secrets are looked up in `env` by the names it gives.

    Raises RuleFileError with every problem found, each naming its line.
    """
    problems = _Problems(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleFileError([f"{path}: cannot read the rule file: {exc}"]) from exc
    root = _compose(text, problems)
    if problems.items:
        raise RuleFileError(problems.items)
    if root is None:
        return RuleSet()
    if not isinstance(root.value, dict):
        raise RuleFileError([f"{path}:{root.line}: the file must be a mapping with `rules:`"])
    _unknown_keys(root.value, _TOP_KEYS, "the file", problems)

    channels: dict[str, ChannelConfig] = {}
    declared: set[str] = set()  # every name under `channels`, usable or not
    channels_node = root.value.get("channels")
    if channels_node is not None:
        if not isinstance(channels_node.value, dict):
            problems.add(channels_node.line, "`channels` must map channel names to settings")
        else:
            declared = set(channels_node.value)
            for name, node in channels_node.value.items():
                channel = _channel(name, node, env, problems)
                if channel is not None:
                    channels[name] = channel

    rules: list[Rule] = []
    rules_node = root.value.get("rules")
    if rules_node is not None and rules_node.value is not None:
        if not isinstance(rules_node.value, list):
            problems.add(rules_node.line, "`rules` must be a list")
        else:
            # The name is the rule's identity in the state database, so it must be unique
            # even among disabled rules.
            seen: dict[str, int] = {}
            for node in rules_node.value:
                name_node = node.value.get("name") if isinstance(node.value, dict) else None
                if name_node is not None and isinstance(name_node.value, str):
                    if name_node.value in seen:
                        problems.add(
                            name_node.line,
                            f"rule {name_node.value!r} is already defined on line "
                            f"{seen[name_node.value]}",
                        )
                        continue
                    seen[name_node.value] = name_node.line
                rule = _rule(node, declared, problems)
                if rule is not None:
                    rules.append(rule)
    if problems.items:
        raise RuleFileError(problems.items)
    return RuleSet(tuple(rules), channels)


def _unknown_keys(
    mapping: Mapping[str, _Node], allowed: frozenset[str], where: str, problems: _Problems
) -> None:
    for key, node in mapping.items():
        if key not in allowed:
            hint = _SECRET_HINTS.get(key) or f"expected one of {', '.join(sorted(allowed))}"
            problems.add(node.line, f"{where}: unknown key {key!r}: {hint}")


def _rule(node: _Node, channels: set[str], problems: _Problems) -> Rule | None:
    if not isinstance(node.value, dict):
        problems.add(node.line, "each rule is a mapping with name, when and channels")
        return None
    spec: dict[str, _Node] = node.value
    name_node = spec.get("name")
    name = name_node.value if name_node else None
    if not isinstance(name, str) or not _NAME.match(name):
        problems.add(
            (name_node or node).line,
            "a rule needs a `name` of letters, digits, '_', '-', '.' (at most 64)",
        )
        return None
    where = f"rule {name!r}"
    _unknown_keys(spec, _RULE_KEYS, where, problems)
    enabled = _Reader(spec, node.line, where, {}, problems).boolean("enabled", True)

    condition: Condition | None = None
    when = spec.get("when")
    if when is None:
        problems.add(node.line, f"{where}: needs a `when` condition")
    else:
        expr = _when(when, where, problems)
        if expr is not None:
            condition = Condition(_describe(when), expr)

    channel_names: list[str] = []
    channels_node = spec.get("channels")
    listed = channels_node.value if channels_node else None
    if not isinstance(listed, list) or not listed:
        problems.add(
            (channels_node or node).line,
            f"{where}: needs `channels`, a non-empty list of channel names",
        )
    else:
        for item in listed:
            if not isinstance(item.value, str):
                problems.add(item.line, f"{where}: channel names are strings")
            elif item.value not in channels:
                known = ", ".join(sorted(channels)) or "none"
                problems.add(
                    item.line,
                    f"{where}: channel {item.value!r} is not defined under `channels` "
                    f"(defined: {known})",
                )
            elif item.value in channel_names:
                problems.add(item.line, f"{where}: channel {item.value!r} is listed twice")
            else:
                channel_names.append(item.value)
    if condition is None or not channel_names or not enabled:
        return None
    return Rule(name, condition, tuple(channel_names), node.line)


def _when(node: _Node, where: str, problems: _Problems) -> Expr | None:
    """A condition string, or a mapping with exactly one of all / any / not."""
    if isinstance(node.value, bool):
        return Const(node.value)
    if isinstance(node.value, str):
        try:
            return parse_condition(node.value).expr
        except ConditionError as exc:
            _condition_problem(node, exc, where, problems)
            return None
    if isinstance(node.value, dict) and len(node.value) == 1:
        ((key, inner),) = node.value.items()
        if key == "not":
            expr = _when(inner, where, problems)
            return None if expr is None else Not(expr)
        if key in ("all", "any"):
            if not isinstance(inner.value, list) or not inner.value:
                problems.add(inner.line, f"{where}: `{key}` needs a non-empty list of conditions")
                return None
            parts = [_when(item, where, problems) for item in inner.value]
            if any(part is None for part in parts):
                return None
            operands = tuple(part for part in parts if part is not None)
            return All(operands) if key == "all" else AnyOf(operands)
    problems.add(
        node.line,
        f"{where}: a condition is a string such as `sentiment < 5`, or a mapping with "
        "exactly one of `all: [...]`, `any: [...]`, `not: ...`",
    )
    return None


def _condition_problem(node: _Node, exc: ConditionError, where: str, problems: _Problems) -> None:
    text: str = node.value
    if node.multiline:
        # Block scalars start on the line after their indicator; count the lines before
        # the error inside the text.
        line = node.line + (1 if node.style in ("|", ">") else 0) + text.count("\n", 0, exc.offset)
        problems.add(line, f"{where}: condition: {exc.message}")
        return
    quote = 1 if node.style in ("'", '"') else 0
    column = node.column + quote + exc.offset
    caret = " " * exc.offset + "^"
    problems.add(
        node.line, f"{where}: condition: {exc.message}\n    {text}\n    {caret}", column=column
    )


def _describe(node: _Node) -> str:
    """The condition as one line of text, for `$condition` in messages."""
    value = node.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return " ".join(value.split())
    (key, inner), *_ = value.items()
    if key == "not":
        return f"not ({_describe(inner)})"
    joiner = " and " if key == "all" else " or "
    return joiner.join(f"({_describe(item)})" for item in inner.value)


def _channel(
    name: str, node: _Node, env: Mapping[str, str], problems: _Problems
) -> ChannelConfig | None:
    where = f"channel {name!r}"
    if not _NAME.match(name):
        problems.add(node.line, f"{where}: names are letters, digits, '_', '-', '.' (at most 64)")
        return None
    if not isinstance(node.value, dict):
        problems.add(node.line, f"{where}: settings must be a mapping with a `type`")
        return None
    spec: dict[str, _Node] = node.value
    type_node = spec.get("type")
    if type_node is None or type_node.value not in CHANNEL_TYPES:
        problems.add(
            (type_node or node).line,
            f"{where}: `type` must be one of {', '.join(CHANNEL_TYPES)}",
        )
        return None
    kind: ChannelType = type_node.value
    _unknown_keys(spec, _CHANNEL_KEYS[kind], where, problems)
    before = len(problems.items)
    read = _Reader(spec, node.line, where, env, problems)
    rate = _rate(spec.get("rate"), where, problems)
    template = read.template("template", DEFAULT_TEMPLATES[kind])
    channel: ChannelConfig
    if kind in ("slack", "webhook"):
        url = read.url()
        if kind == "slack":
            channel = SlackChannel(name=name, url=url, template=template, rate=rate)
        else:
            secret = read.required_secret("secret_env")
            channel = WebhookChannel(
                name=name, url=url, secret=secret, template=template, rate=rate
            )
    else:
        tls = read.boolean("tls", False)
        starttls = read.boolean("starttls", not tls)
        if tls and starttls:
            problems.add(node.line, f"{where}: `tls` and `starttls` exclude each other")
        username = read.optional_str("username")
        password = read.secret("password_env")
        if username and not (tls or starttls):
            read.problem("username", "refusing to send a password without `tls` or `starttls`")
        if password is not None and not username:
            read.problem("password_env", "`password_env` needs `username`")
        channel = EmailChannel(
            name=name,
            host=read.required_str("host"),
            port=read.integer("port", 465 if tls else 587, 1, 65535),
            tls=tls,
            starttls=starttls,
            sender=read.address("from"),
            recipients=read.addresses("to"),
            username=username,
            password=password,
            subject=read.template("subject", DEFAULT_EMAIL_SUBJECT),
            template=template,
            rate=rate,
        )
    return channel if len(problems.items) == before else None


def _rate(node: _Node | None, where: str, problems: _Problems) -> RateLimit:
    if node is None:
        return RateLimit()
    if not isinstance(node.value, dict):
        problems.add(node.line, f"{where}: `rate` is a mapping with per_second and burst")
        return RateLimit()
    _unknown_keys(node.value, frozenset({"per_second", "burst"}), f"{where} rate", problems)
    per_second = node.value.get("per_second")
    burst = node.value.get("burst")
    rate = RateLimit()
    if per_second is not None:
        value = per_second.value
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1000:
            problems.add(per_second.line, f"{where}: rate.per_second must be a number in (0, 1000]")
        else:
            rate = RateLimit(float(value), rate.burst)
    if burst is not None:
        value = burst.value
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
            problems.add(burst.line, f"{where}: rate.burst must be an integer in [1, 1000]")
        else:
            rate = RateLimit(rate.per_second, value)
    return rate


@dataclass(frozen=True, slots=True)
class _Reader:
    """Typed access to one channel's or rule's settings, each problem recorded with its line."""

    spec: Mapping[str, _Node]
    line: int  # the channel's or rule's own, for a problem with a key that is missing
    where: str
    env: Mapping[str, str]
    problems: _Problems

    def problem(self, key: str, message: str) -> None:
        node = self.spec.get(key)
        self.problems.add(node.line if node else self.line, f"{self.where}: {message}")

    def optional_str(self, key: str) -> str | None:
        node = self.spec.get(key)
        if node is None:
            return None
        if not isinstance(node.value, str) or not node.value.strip():
            self.problem(key, f"`{key}` must be a non-empty string")
            return None
        return node.value.strip()

    def required_str(self, key: str) -> str:
        if key not in self.spec:
            self.problem(key, f"needs `{key}`")
            return ""
        return self.optional_str(key) or ""

    def boolean(self, key: str, default: bool) -> bool:
        node = self.spec.get(key)
        if node is None:
            return default
        if not isinstance(node.value, bool):
            self.problem(key, f"`{key}` must be true or false")
            return default
        return node.value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        node = self.spec.get(key)
        if node is None:
            return default
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.problem(key, f"`{key}` must be an integer in [{low}, {high}]")
            return default
        return value

    def template(self, key: str, default: str) -> str:
        if self.optional_str(key) is None:
            return default
        text: str = self.spec[key].value  # unstripped: the author's layout is kept
        template = Template(text)
        if not template.is_valid():
            self.problem(key, f"`{key}` has a stray '$': write $$ for a dollar sign")
            return default
        unknown = sorted(set(template.get_identifiers()) - TEMPLATE_FIELDS)
        if unknown:
            self.problem(
                key,
                f"`{key}` uses unknown placeholder(s) {', '.join('$' + u for u in unknown)}; "
                f"available: {', '.join('$' + f for f in sorted(TEMPLATE_FIELDS))}",
            )
            return default
        return text

    def _from_env(self, key: str) -> str | None:
        name = self.optional_str(key)
        if name is None:
            return None
        if not _ENV_NAME.match(name):
            self.problem(key, f"`{key}` names an environment variable, not a value")
            return None
        value = self.env.get(name, "").strip()
        if not value:
            self.problem(key, f"environment variable {name} (from `{key}`) is not set")
            return None
        return value

    def secret(self, key: str) -> Secret | None:
        """The secret in the environment variable `key` names; None when `key` is absent."""
        if key not in self.spec:
            return None
        return Secret(self._from_env(key) or "")

    def required_secret(self, key: str) -> Secret:
        if key not in self.spec:
            self.problem(key, f"needs `{key}`, the environment variable holding the secret")
        return self.secret(key) or Secret("")

    def url(self) -> Secret:
        has_url, has_env = "url" in self.spec, "url_env" in self.spec
        if has_url == has_env:
            self.problem("url", "needs exactly one of `url` and `url_env`")
            return Secret("")
        key = "url" if has_url else "url_env"
        value = self.optional_str(key) if has_url else self._from_env(key)
        if value is None:
            return Secret("")
        try:
            parsed = URL(value)
        except ValueError:
            parsed = None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
            # The value may be a secret (url_env): describe it, never echo it.
            self.problem(key, f"`{key}` must be an http:// or https:// URL with a host")
            return Secret("")
        return Secret(value)

    def address(self, key: str) -> str:
        value = self.required_str(key)
        if value and not _EMAIL.match(value):
            self.problem(key, f"`{key}` must be one e-mail address")
        return value

    def addresses(self, key: str) -> tuple[str, ...]:
        node = self.spec.get(key)
        if node is None:
            self.problem(key, f"needs `{key}`: one address or a list")
            return ()
        items = node.value if isinstance(node.value, list) else [node]
        if not items:
            self.problem(key, f"`{key}` is empty")
        out: list[str] = []
        for item in items:
            if isinstance(item.value, str) and _EMAIL.match(item.value.strip()):
                out.append(item.value.strip())
            else:
                self.problems.add(item.line, f"{self.where}: `{key}` holds e-mail addresses")
        return tuple(out)
