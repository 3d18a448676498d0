"""Alert rules: a tiny condition language over a call report, and the YAML file that holds
rules and the channels they notify.

Condition language (parsed once at start-up, never `eval`):

    condition  := or_expr
    or_expr    := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | comparison
    comparison := operand (("==" | "!=" | "<" | "<=" | ">" | ">=") operand)?
    operand    := field | number | string | "true" | "false" | "null" | "(" condition ")"

Precedence, loosest first: `or`, `and`, `not`, comparison (`not a == 1` is `not (a == 1)`).
Comparisons do not chain: write `1 < x and x < 5`.

Fields: a name such as `sentiment` or a dotted path `user_metadata.candidateId` (names may
hold letters, digits, `_` and `-`). A *bare* name looks in the report's structuredData
first and falls back to the canonical report fields, so **structuredData wins** when both
have the key: the rule author thinks in terms of the assistant's own analysis. Prefix
`structured.` or `report.` to pin the lookup (`report.duration_seconds` keeps meaning the
call length even if an assistant later adds a `duration_seconds` key). Canonical fields
answer to their snake_case name and to its camelCase spelling (`successEvaluation`).
A `report.` field that does not exist is a start-up error; an unknown bare or
`structured.` name is not, because assistants add keys whenever their owners edit them.

Values and comparisons:
* A missing key and a JSON null are both `null`.
* `x == null` / `x != null` (the literal `null` on either side) test presence.
* Otherwise both sides must be of one type (number, string, boolean, array, object) or the
  comparison is false, for every operator including `!=`: `sentiment != 5` does not match a
  call whose sentiment is missing or the string "5". (`not sentiment == 5` does.)
* Ordering (`<` ...) compares numbers numerically and strings by code point; on anything
  else it is false.
* A bare operand is truthy unless it is null, false, 0, "" or an empty array/object. Note
  that Flireo's successEvaluation is usually the *string* "true"/"false", and the string
  "false" is truthy: write `successEvaluation == "false"`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from string import Template
from typing import Any, ClassVar, Final, Literal, TypeAlias

import yaml
from yarl import URL

from core.secret import Secret
from core.settings import SettingsError
from schemas.report import CallReport

# -- the condition language ----------------------------------------------------------------

MAX_CONDITION_LENGTH: Final = 2000
MAX_NESTING: Final = 32

Scalar: TypeAlias = bool | int | float | str | None
CompareOp: TypeAlias = Literal["==", "!=", "<", "<=", ">", ">="]
Scope: TypeAlias = Literal["auto", "structured", "report"]


class ConditionError(ValueError):
    """A condition that cannot be parsed; `offset` is where in its text the problem is."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


@dataclass(frozen=True, slots=True)
class _Token:
    kind: Literal["num", "str", "name", "kw", "op", "(", ")", "end"]
    text: str
    offset: int
    value: Scalar = None


_KEYWORDS: Final = frozenset({"and", "or", "not", "true", "false", "null"})
_NAME_PART = r"[^\W\d][\w-]*"
_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
    | (?P<num>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)
    | (?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
    | (?P<op>==|!=|<=|>=|<|>)
    | (?P<paren>[()])
    | (?P<name>"""
    + _NAME_PART
    + r"(?:\."
    + _NAME_PART
    + r""")*)
    """,
    re.VERBOSE,
)
_ESCAPES: Final = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t"}
# Spellings people bring from other languages: a pointed error beats "unexpected '='".
_FOREIGN: Final = {
    "=": "use == to compare",
    "&&": "use `and`",
    "||": "use `or`",
    "!": "use `not` (or != to compare)",
    "&": "use `and`",
    "|": "use `or`",
}


def _unquote(text: str, offset: int) -> str:
    out: list[str] = []
    i = 1
    while i < len(text) - 1:
        char = text[i]
        if char == "\\":
            escaped = text[i + 1]
            if escaped not in _ESCAPES:
                raise ConditionError(f"unknown escape \\{escaped} in a string", offset + i)
            out.append(_ESCAPES[escaped])
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            for foreign in sorted(_FOREIGN, key=len, reverse=True):
                if text.startswith(foreign, pos):
                    raise ConditionError(f"unexpected {foreign!r}: {_FOREIGN[foreign]}", pos)
            if text[pos] in "\"'":
                raise ConditionError("string is not closed on this line", pos)
            raise ConditionError(f"unexpected character {text[pos]!r}", pos)
        kind = match.lastgroup
        raw = match.group()
        if kind == "num":
            number: int | float = float(raw) if any(c in raw for c in ".eE") else int(raw)
            if isinstance(number, float) and not math.isfinite(number):
                raise ConditionError(f"number {raw} is out of range", pos)
            tokens.append(_Token("num", raw, pos, number))
        elif kind == "str":
            tokens.append(_Token("str", raw, pos, _unquote(raw, pos)))
        elif kind == "op":
            tokens.append(_Token("op", raw, pos))
        elif kind == "paren":
            tokens.append(_Token("(" if raw == "(" else ")", raw, pos))
        elif kind == "name":
            if raw in _KEYWORDS:
                tokens.append(_Token("kw", raw, pos))
            elif raw.lower() in _KEYWORDS:
                raise ConditionError(f"keywords are lower case: write {raw.lower()!r}", pos)
            else:
                tokens.append(_Token("name", raw, pos))
        pos = match.end()
    tokens.append(_Token("end", "", len(text)))
    return tokens


# AST. Every node is immutable and hashable, so a parsed rule can sit in frozen settings.


@dataclass(frozen=True, slots=True)
class Const:
    value: Scalar


@dataclass(frozen=True, slots=True)
class FieldRef:
    text: str  # as written, for messages and $matched
    scope: Scope
    path: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Compare:
    op: CompareOp
    left: Expr
    right: Expr


@dataclass(frozen=True, slots=True)
class Not:
    operand: Expr


@dataclass(frozen=True, slots=True)
class All:
    operands: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    operands: tuple[Expr, ...]


Expr: TypeAlias = Const | FieldRef | Compare | Not | All | AnyOf

# Canonical fields a rule may read. Times are left out: the language has no time literals.
CANONICAL_FIELDS: Final = tuple(
    f.name for f in fields(CallReport) if f.name not in {"event_time", "received_at"}
)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


_CANONICAL_ALIASES: Final = {
    **{name: name for name in CANONICAL_FIELDS},
    **{_camel(name): name for name in CANONICAL_FIELDS},
}


class _Parser:
    def __init__(self, text: str) -> None:
        self._tokens = _tokenize(text)
        self._pos = 0
        self._depth = 0

    def parse(self) -> Expr:
        expr = self._or()
        token = self._peek()
        if token.kind != "end":
            if token.kind == "op":
                raise ConditionError(
                    "comparisons cannot be chained: write `a < x and x < b`", token.offset
                )
            raise ConditionError(f"unexpected {token.text!r}: expected `and`, `or`", token.offset)
        return expr

    def _peek(self) -> _Token:
        return self._tokens[self._pos]

    def _next(self) -> _Token:
        token = self._tokens[self._pos]
        self._pos += 1
        return token

    def _is_kw(self, word: str) -> bool:
        token = self._peek()
        return token.kind == "kw" and token.text == word

    def _or(self) -> Expr:
        operands = [self._and()]
        while self._is_kw("or"):
            self._next()
            operands.append(self._and())
        return operands[0] if len(operands) == 1 else AnyOf(tuple(operands))

    def _and(self) -> Expr:
        operands = [self._not()]
        while self._is_kw("and"):
            self._next()
            operands.append(self._not())
        return operands[0] if len(operands) == 1 else All(tuple(operands))

    def _not(self) -> Expr:
        if self._is_kw("not"):
            token = self._next()
            with self._nested(token):
                return Not(self._not())
        return self._comparison()

    def _comparison(self) -> Expr:
        left_token = self._peek()
        left = self._operand()
        if self._peek().kind != "op":
            return left
        op_token = self._next()
        right_token = self._peek()
        right = self._operand()
        op: CompareOp = op_token.text  # type: ignore[assignment]  # the tokenizer's op group
        _check_literals(op, left, right, left_token.offset, right_token.offset)
        return Compare(op, left, right)

    def _operand(self) -> Expr:
        token = self._next()
        if token.kind in ("num", "str"):
            return Const(token.value)
        if token.kind == "kw" and token.text in ("true", "false", "null"):
            return Const({"true": True, "false": False, "null": None}[token.text])
        if token.kind == "name":
            return _field(token)
        if token.kind == "(":
            with self._nested(token):
                inner = self._or()
            closing = self._next()
            if closing.kind != ")":
                raise ConditionError(
                    f"expected ')' to close the '(' at column {token.offset + 1}",
                    closing.offset,
                )
            return inner
        if token.kind == "end":
            raise ConditionError("condition ends where a value was expected", token.offset)
        raise ConditionError(
            f"unexpected {token.text!r}: expected a field or a value", token.offset
        )

    @contextmanager
    def _nested(self, token: _Token) -> Iterator[None]:
        self._depth += 1
        if self._depth > MAX_NESTING:
            raise ConditionError(f"nested deeper than {MAX_NESTING} levels", token.offset)
        try:
            yield
        finally:
            self._depth -= 1


def _field(token: _Token) -> FieldRef:
    parts = tuple(token.text.split("."))
    if parts[0] == "structured" and len(parts) > 1:
        return FieldRef(token.text, "structured", parts[1:])
    if parts[0] == "report" and len(parts) > 1:
        canonical = _CANONICAL_ALIASES.get(parts[1])
        if canonical is None:
            raise ConditionError(
                f"{token.text!r}: the report has no field {parts[1]!r} "
                f"(it has {', '.join(CANONICAL_FIELDS)})",
                token.offset,
            )
        return FieldRef(token.text, "report", (canonical, *parts[2:]))
    return FieldRef(token.text, "auto", parts)


def _check_literals(op: CompareOp, left: Expr, right: Expr, left_at: int, right_at: int) -> None:
    """Mistakes visible without a report: ordering on booleans/null, literals of two types."""
    for side, at in ((left, left_at), (right, right_at)):
        if (
            op not in ("==", "!=")
            and isinstance(side, Const)
            and (side.value is None or isinstance(side.value, bool))
        ):
            raise ConditionError(f"{op} needs numbers or strings, not {_kind(side.value)}", at)
    if (
        isinstance(left, Const)
        and isinstance(right, Const)
        and _kind(left.value) != _kind(right.value)
    ):
        raise ConditionError(
            f"compares {_kind(left.value)} with {_kind(right.value)}: always false", left_at
        )


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


@dataclass(frozen=True, slots=True)
class Condition:
    """A parsed condition; `evaluate` never raises on report content."""

    text: str
    expr: Expr

    def evaluate(self, view: ReportView) -> bool:
        return _truthy(_eval(self.expr, view))

    @property
    def fields(self) -> tuple[FieldRef, ...]:
        """The fields it reads, first occurrence order (for the message's `$matched`)."""
        seen: dict[str, FieldRef] = {}
        for ref in _walk(self.expr):
            seen.setdefault(ref.text, ref)
        return tuple(seen.values())


def parse_condition(text: str) -> Condition:
    if not text.strip():
        raise ConditionError("condition is empty", 0)
    if len(text) > MAX_CONDITION_LENGTH:
        raise ConditionError(f"longer than {MAX_CONDITION_LENGTH} characters", 0)
    return Condition(text, _Parser(text).parse())


def _walk(expr: Expr) -> Iterator[FieldRef]:
    match expr:
        case FieldRef():
            yield expr
        case Compare(_, left, right):
            yield from _walk(left)
            yield from _walk(right)
        case Not(operand):
            yield from _walk(operand)
        case All(operands) | AnyOf(operands):
            for operand in operands:
                yield from _walk(operand)
        case Const():
            pass


class ReportView:
    """What conditions read: the structuredData object and the canonical fields."""

    __slots__ = ("_canonical", "_structured")

    def __init__(self, report: CallReport) -> None:
        structured = report.structured_data
        self._structured: Mapping[str, Any] = structured if isinstance(structured, dict) else {}
        self._canonical = {name: getattr(report, name) for name in CANONICAL_FIELDS}

    def lookup(self, ref: FieldRef) -> Any:
        head, *rest = ref.path
        if ref.scope == "structured" or (ref.scope == "auto" and head in self._structured):
            return _descend(self._structured.get(head), rest)
        canonical = _CANONICAL_ALIASES.get(head) if ref.scope == "auto" else head
        if canonical is None:
            return None
        return _descend(self._canonical[canonical], rest)


def _descend(value: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _eval(expr: Expr, view: ReportView) -> Any:
    match expr:
        case Const(value):
            return value
        case FieldRef():
            return view.lookup(expr)
        case Compare(op, left, right):
            presence = (isinstance(left, Const) and left.value is None) or (
                isinstance(right, Const) and right.value is None
            )
            return _compare(op, _eval(left, view), _eval(right, view), presence=presence)
        case Not(operand):
            return not _truthy(_eval(operand, view))
        case All(operands):
            return all(_truthy(_eval(operand, view)) for operand in operands)
        case AnyOf(operands):
            return any(_truthy(_eval(operand, view)) for operand in operands)


_ORDERING: Final[Mapping[str, Callable[[Any, Any], bool]]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _compare(op: CompareOp, left: Any, right: Any, *, presence: bool) -> bool:
    if presence and op in ("==", "!="):
        both_null = left is None and right is None
        return both_null if op == "==" else not both_null
    kind = _kind(left)
    if kind != _kind(right):
        return False
    if op == "==":
        return bool(left == right)
    if op == "!=":
        return bool(left != right)
    if kind not in ("number", "string"):
        return False
    return _ORDERING[op](left, right)


def _truthy(value: Any) -> bool:
    if value is None or value is False:
        return False
    if isinstance(value, bool):
        return True
    if isinstance(value, int | float | str | list | dict):
        return bool(value)
    return True


# -- channels and rules --------------------------------------------------------------------

ChannelType: TypeAlias = Literal["slack", "webhook", "email"]
CHANNEL_TYPES: Final[tuple[ChannelType, ...]] = ("slack", "webhook", "email")

#: Placeholders a template may use (string.Template `$name`). Values are privacy-safe by
#: construction: phone numbers masked, URLs removed, free text cut short.
TEMPLATE_FIELDS: Final = frozenset(
    {
        "rule",
        "call_id",
        "event_time",
        "call_type",
        "call_status",
        "ended_reason",
        "assistant_name",
        "duration_seconds",
        "from_number",
        "to_number",
        "success_evaluation",
        "summary",
        "excerpt",
        "matched",
        "condition",
    }
)

DEFAULT_TEMPLATES: Final[Mapping[ChannelType, str]] = {
    "slack": (
        "*$rule*: call $call_id ($call_type, $duration_seconds s, from $from_number)\n"
        "matched: $matched\n"
        "$summary\n"
        "> $excerpt"
    ),
    "webhook": "$rule: call $call_id from $from_number ($duration_seconds s): $summary",
    "email": (
        "Rule: $rule\n"
        "Matched: $matched\n"
        "Call: $call_id at $event_time\n"
        "Type: $call_type, ended: $ended_reason, duration: $duration_seconds s\n"
        "From: $from_number  To: $to_number\n"
        "Success evaluation: $success_evaluation\n"
        "\n"
        "Summary:\n$summary\n"
        "\n"
        "Transcript excerpt:\n$excerpt\n"
    ),
}
DEFAULT_EMAIL_SUBJECT: Final = "[callstream] $rule: call $call_id"


@dataclass(frozen=True, slots=True)
class RateLimit:
    per_second: float = 1.0
    burst: int = 5


@dataclass(frozen=True, slots=True)
class SlackChannel:
    type: ClassVar[ChannelType] = "slack"
    name: str
    url: Secret  # an incoming-webhook URL carries its own token
    template: str
    rate: RateLimit


@dataclass(frozen=True, slots=True)
class WebhookChannel:
    type: ClassVar[ChannelType] = "webhook"
    name: str
    url: Secret
    secret: Secret
    template: str
    rate: RateLimit


@dataclass(frozen=True, slots=True)
class EmailChannel:
    type: ClassVar[ChannelType] = "email"
    name: str
    host: str
    port: int
    tls: bool  # implicit TLS from the first byte (usually port 465)
    starttls: bool  # upgrade a plain connection (usually port 587)
    sender: str
    recipients: tuple[str, ...]
    username: str | None
    password: Secret | None
    subject: str
    template: str
    rate: RateLimit


ChannelConfig: TypeAlias = SlackChannel | WebhookChannel | EmailChannel


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
    channels_node = root.value.get("channels")
    if channels_node is not None:
        if not isinstance(channels_node.value, dict):
            problems.add(channels_node.line, "`channels` must map channel names to settings")
        else:
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
            declared = (
                set(channels_node.value)
                if channels_node and isinstance(channels_node.value, dict)
                else set()
            )
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
    if (
        name_node is None
        or not isinstance(name_node.value, str)
        or not _NAME.match(name_node.value)
    ):
        problems.add(
            name_node.line if name_node else node.line,
            "a rule needs a `name` of letters, digits, '_', '-', '.' (at most 64)",
        )
        return None
    name = name_node.value
    where = f"rule {name!r}"
    _unknown_keys(spec, _RULE_KEYS, where, problems)
    enabled = spec.get("enabled")
    if enabled is not None and not isinstance(enabled.value, bool):
        problems.add(enabled.line, f"{where}: `enabled` must be true or false")

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
    if (
        channels_node is None
        or not isinstance(channels_node.value, list)
        or not channels_node.value
    ):
        problems.add(
            channels_node.line if channels_node else node.line,
            f"{where}: needs `channels`, a non-empty list of channel names",
        )
    else:
        for item in channels_node.value:
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
    if condition is None or not channel_names or (enabled is not None and enabled.value is False):
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
            type_node.line if type_node else node.line,
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
            channel = SlackChannel(name, url, template, rate)
        else:
            channel = WebhookChannel(name, url, read.required_secret("secret_env"), template, rate)
    else:
        tls = read.boolean("tls", False)
        starttls = read.boolean("starttls", not tls)
        if tls and starttls:
            problems.add(node.line, f"{where}: `tls` and `starttls` exclude each other")
        username = read.optional_str("username")
        password = read.secret("password_env")
        if username and not (tls or starttls):
            problems.add(
                spec["username"].line,
                f"{where}: refusing to send a password without `tls` or `starttls`",
            )
        if password is not None and not username:
            problems.add(spec["password_env"].line, f"{where}: `password_env` needs `username`")
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


class _Reader:
    """Typed access to one channel's settings; each problem is recorded with its line."""

    def __init__(
        self,
        spec: Mapping[str, _Node],
        line: int,
        where: str,
        env: Mapping[str, str],
        problems: _Problems,
    ) -> None:
        self._spec = spec
        self._line = line
        self._where = where
        self._env = env
        self._problems = problems

    def _problem(self, key: str, message: str) -> None:
        node = self._spec.get(key)
        self._problems.add(node.line if node else self._line, f"{self._where}: {message}")

    def optional_str(self, key: str) -> str | None:
        node = self._spec.get(key)
        if node is None:
            return None
        if not isinstance(node.value, str) or not node.value.strip():
            self._problem(key, f"`{key}` must be a non-empty string")
            return None
        return node.value.strip()

    def required_str(self, key: str) -> str:
        if key not in self._spec:
            self._problem(key, f"needs `{key}`")
            return ""
        return self.optional_str(key) or ""

    def boolean(self, key: str, default: bool) -> bool:
        node = self._spec.get(key)
        if node is None:
            return default
        if not isinstance(node.value, bool):
            self._problem(key, f"`{key}` must be true or false")
            return default
        return node.value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        node = self._spec.get(key)
        if node is None:
            return default
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self._problem(key, f"`{key}` must be an integer in [{low}, {high}]")
            return default
        return value

    def template(self, key: str, default: str) -> str:
        node = self._spec.get(key)
        if node is None:
            return default
        if not isinstance(node.value, str) or not node.value.strip():
            self._problem(key, f"`{key}` must be a non-empty string")
            return default
        template = Template(node.value)
        if not template.is_valid():
            self._problem(key, f"`{key}` has a stray '$': write $$ for a dollar sign")
            return default
        unknown = sorted(set(template.get_identifiers()) - TEMPLATE_FIELDS)
        if unknown:
            self._problem(
                key,
                f"`{key}` uses unknown placeholder(s) {', '.join('$' + u for u in unknown)}; "
                f"available: {', '.join('$' + f for f in sorted(TEMPLATE_FIELDS))}",
            )
            return default
        return node.value

    def _from_env(self, key: str) -> str | None:
        name = self.optional_str(key)
        if name is None:
            return None
        if not _ENV_NAME.match(name):
            self._problem(key, f"`{key}` names an environment variable, not a value")
            return None
        value = self._env.get(name, "").strip()
        if not value:
            self._problem(key, f"environment variable {name} (from `{key}`) is not set")
            return None
        return value

    def secret(self, key: str) -> Secret | None:
        """The secret in the environment variable `key` names; None when `key` is absent."""
        if key not in self._spec:
            return None
        return Secret(self._from_env(key) or "")

    def required_secret(self, key: str) -> Secret:
        if key not in self._spec:
            self._problem(key, f"needs `{key}`, the environment variable holding the secret")
        return self.secret(key) or Secret("")

    def url(self) -> Secret:
        has_url, has_env = "url" in self._spec, "url_env" in self._spec
        if has_url == has_env:
            self._problem("url", "needs exactly one of `url` and `url_env`")
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
            self._problem(key, f"`{key}` must be an http:// or https:// URL with a host")
            return Secret("")
        return Secret(value)

    def address(self, key: str) -> str:
        value = self.required_str(key)
        if value and not _EMAIL.match(value):
            self._problem(key, f"`{key}` must be one e-mail address")
        return value

    def addresses(self, key: str) -> tuple[str, ...]:
        node = self._spec.get(key)
        if node is None:
            self._problem(key, f"needs `{key}`: one address or a list")
            return ()
        items = node.value if isinstance(node.value, list) else [node]
        if not items:
            self._problem(key, f"`{key}` is empty")
        out: list[str] = []
        for item in items:
            if isinstance(item.value, str) and _EMAIL.match(item.value.strip()):
                out.append(item.value.strip())
            else:
                self._problems.add(item.line, f"{self._where}: `{key}` holds e-mail addresses")
        return tuple(out)
