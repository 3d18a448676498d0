"""The condition language of alert rules: a tiny expression language over a call report.

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
import operator
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Final, Literal, TypeAlias

from schemas.report import CallReport

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
    rf"""
    (?P<ws>\s+)
    | (?P<num>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)
    | (?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
    | (?P<op>==|!=|<=|>=|<|>)
    | (?P<paren>[()])
    | (?P<name>{_NAME_PART}(?:\.{_NAME_PART})*)
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
    def escape(match: re.Match[str]) -> str:
        escaped = match.group(1)
        if escaped not in _ESCAPES:
            # +1: the match is in the text without its opening quote.
            raise ConditionError(
                f"unknown escape \\{escaped} in a string", offset + match.start() + 1
            )
        return _ESCAPES[escaped]

    return re.sub(r"\\(.)", escape, text[1:-1])


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
        return self._joined("or", self._and, AnyOf)

    def _and(self) -> Expr:
        return self._joined("and", self._not, All)

    def _joined(
        self, word: str, operand: Callable[[], Expr], node: Callable[[tuple[Expr, ...]], Expr]
    ) -> Expr:
        """`operand (word operand)*`, a single operand left as it is."""
        operands = [operand()]
        while self._is_kw(word):
            self._next()
            operands.append(operand())
        return operands[0] if len(operands) == 1 else node(tuple(operands))

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


# bool before number: a bool is an int to isinstance.
_KINDS: Final = ((bool, "boolean"), (int | float, "number"), (str, "string"), (list, "array"))


def _kind(value: object) -> str:
    """The JSON type of a value, as messages and comparisons name it."""
    if value is None:
        return "null"
    return next((name for types, name in _KINDS if isinstance(value, types)), "object")


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
        return tuple(dict.fromkeys(_walk(self.expr)))


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


_ORDERING: Final = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


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
    return kind in ("number", "string") and bool(_ORDERING[op](left, right))


def _truthy(value: Any) -> bool:
    if value is None or isinstance(value, int | float | str | list | dict):
        return bool(value)  # null, false, 0, "" and empty arrays/objects are false
    return True
