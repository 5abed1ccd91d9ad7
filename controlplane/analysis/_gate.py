"""A Prometheus query gate as written in a plan: its definition, the placeholders its query may
use, and the submission-time check that reports every problem with its field path."""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

import promql_parser

from controlplane.policy import ExpressionError, compile_expression

PLACEHOLDERS = frozenset({"namespace", "name", "cluster", "plan_id"})
"""What `{{...}}` in a gate's query may name; the caller supplies the values per run."""

CONDITION_VARIABLES = frozenset({"result"})
"""The variables a gate's conditions see: a list of numbers (vector) or one number (scalar)."""

DEFAULT_CONSECUTIVE_ERROR_LIMIT = 4
"""Argo Rollouts' default: the fifth error in a row ends the gate."""

MAX_INTERVAL_S = 3600.0
MAX_COUNT = 1000
MAX_ERROR_LIMIT = 100
MAX_TIMEOUT_S = 300.0
MAX_QUERY_CHARS = 10_000
MAX_QUERY_NESTING = 64
MAX_QUERY_OPERATORS = 200

_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$")
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
# Substituted values land inside PromQL, usually in a quoted label value: anything that could
# end the string or start new syntax is refused rather than escaped, since we cannot know the
# context the author put the placeholder in.
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.:/@+-]*$")
# Words PromQL uses as binary operators; they nest like symbols do.
_OPERATOR_WORDS = frozenset({"and", "or", "unless", "atan2"})
_WORD = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
# A stand-in for every placeholder when parsing a query at submission: valid as a label value,
# a metric-name fragment and a label name alike.
_SAMPLE_VALUE = "placeholder"


class GateInvalid(ValueError):
    """A gate that cannot be run as written; `problems` lists (field path, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {message}" for path, message in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class PrometheusGate:
    """An analysis step between rollout steps: an instant PromQL query measured `count` times,
    each result judged by CEL conditions, the whole judged by Argo Rollouts' limits."""

    name: str
    """Names the gate in measurements, outcomes and audit rows."""
    address: str
    """Prometheus base URL, http or https, e.g. `http://prometheus.monitoring:9090`."""
    query: str
    """Instant PromQL; `{{namespace}}`, `{{name}}`, `{{cluster}}`, `{{plan_id}}` are replaced."""
    success_condition: str
    """CEL over `result`; without a failure condition, false means the measurement failed."""
    failure_condition: str = ""
    """Optional CEL over `result`; true means the measurement failed (it wins over success)."""
    interval_s: float = 60.0
    """Seconds from the end of one measurement to the start of the next."""
    count: int = 1
    """Measurements that must be taken (errors are retried and do not count)."""
    failure_limit: int = 0
    """Failed measurements tolerated; one more fails the gate."""
    inconclusive_limit: int = 0
    """Inconclusive measurements tolerated; one more makes the gate inconclusive."""
    consecutive_error_limit: int = DEFAULT_CONSECUTIVE_ERROR_LIMIT
    """Errors in a row tolerated; one more makes the gate inconclusive."""
    timeout_s: float = 10.0
    """Deadline of one query, sent to Prometheus too so it stops evaluating."""


def placeholders_in(query: str) -> list[str]:
    """The names in `{{...}}` placeholders of `query`, in order of appearance, repeats removed."""
    return list(dict.fromkeys(_PLACEHOLDER.findall(query)))


def resolve_query(query: str, variables: Mapping[str, str]) -> str:
    """`query` with every placeholder replaced by its value; raises ValueError naming a
    placeholder that is unknown, has no value, or has a value that could change the query."""
    for name in placeholders_in(query):
        if name not in PLACEHOLDERS:
            known = ", ".join(f"{{{{{p}}}}}" for p in sorted(PLACEHOLDERS))
            raise ValueError(f"unknown placeholder {{{{{name}}}}}; queries may use {known}")
        value = variables.get(name)
        if value is None:
            raise ValueError(f"no value for placeholder {{{{{name}}}}}")
        if not _SAFE_VALUE.fullmatch(value):
            raise ValueError(
                f"the value {value!r} for {{{{{name}}}}} has characters that could change the "
                "query (allowed: letters, digits and _ . : / @ + -)"
            )
    return _PLACEHOLDER.sub(lambda match: variables[match.group(1)], query)


def address_problem(address: str) -> str | None:
    """Why `address` cannot be a Prometheus base URL, or None."""
    if not address.strip():
        return "required: the Prometheus base URL, e.g. http://prometheus:9090"
    try:
        parts = urllib.parse.urlsplit(address)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"not a URL: {exc}"
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://"
    if not parts.hostname:
        return "has no host"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials: the address is stored and audited with the plan"
    if parts.query or parts.fragment:
        return "must be a base URL, without ?query or #fragment"
    return None


def condition_problem(source: str) -> str | None:
    """Why a gate condition cannot be used, or None."""
    try:
        expression = compile_expression(source)
    except ExpressionError as exc:
        return str(exc)
    unknown = sorted(expression.variables - CONDITION_VARIABLES)
    if unknown:
        return (
            f"unknown variable(s) {', '.join(unknown)}; conditions may use only `result` "
            "(a list of numbers for a vector, a number for a scalar)"
        )
    return None


def _unwrap_parentheses(expr: promql_parser.Expr) -> promql_parser.Expr:
    while isinstance(expr, promql_parser.ParenExpr):
        expr = expr.expr
    return expr


def _complexity_problem(query: str) -> str | None:
    """Why `query` is too deep or long a chain for promql-parser, or None.

    The parser recurses once per nesting level and per operator in a chain, on the native
    stack and in quadratic time (measured with 0.12: 1,000 levels take 0.1-0.25 s, 5,000 take
    3-6 s, and 4,000-8,000 crash the process instead of raising). Counting brackets and
    operator characters outside strings and comments bounds both, far above what a gate query
    needs; each character of a two-character operator counts, so a run of unary minus cannot
    slip through as one."""
    depth = deepest = operators = 0
    at, end = 0, len(query)
    while at < end:
        char = query[at]
        if char in "\"'`":
            at += 1
            while at < end and query[at] != char:
                at += 2 if char != "`" and query[at] == "\\" else 1
        elif char == "#":
            newline = query.find("\n", at)
            at = end if newline < 0 else newline
        elif char in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")]}":
            depth -= 1
        elif char in "+-*/%^<>=!~":
            operators += 1
        elif word := _WORD.match(query, at):
            operators += word.group() in _OPERATOR_WORDS
            at = word.end()
            continue
        at += 1
    if deepest > MAX_QUERY_NESTING:
        return f"nested more than {MAX_QUERY_NESTING} brackets deep"
    if operators > MAX_QUERY_OPERATORS:
        return f"has more than {MAX_QUERY_OPERATORS} operators"
    return None


def query_problem(query: str) -> str | None:
    """Why a gate query cannot be used, or None: unknown placeholders, PromQL syntax, and
    results conditions cannot judge (range vectors, strings)."""
    if not query.strip():
        return "required: an instant PromQL query"
    if len(query) > MAX_QUERY_CHARS:
        return f"longer than {MAX_QUERY_CHARS} characters"
    unknown = [name for name in placeholders_in(query) if name not in PLACEHOLDERS]
    if unknown:
        known = ", ".join(f"{{{{{p}}}}}" for p in sorted(PLACEHOLDERS))
        names = ", ".join(f"{{{{{u}}}}}" for u in unknown)
        return f"unknown placeholder(s) {names}; queries may use {known}"
    sample = resolve_query(query, dict.fromkeys(PLACEHOLDERS, _SAMPLE_VALUE))
    if (why := _complexity_problem(sample)) is not None:
        return why
    try:
        expr = _unwrap_parentheses(promql_parser.parse(sample))
    except ValueError as exc:
        return f"not valid PromQL: {exc}"
    if isinstance(expr, (promql_parser.MatrixSelector, promql_parser.SubqueryExpr)):
        return (
            "returns a range vector; use an instant query (e.g. wrap it in rate() or *_over_time())"
        )
    if isinstance(expr, promql_parser.StringLiteral):
        return "returns a string; conditions need numbers"
    return None


def _seconds_problem(value: float, *, positive: bool, high: float) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "must be a number of seconds"
    if not math.isfinite(value) or value < 0 or value > high or (positive and value == 0):
        return f"must be within {'(' if positive else '['}0, {high:g}] seconds"
    return None


def run_parameter_problems(gate: PrometheusGate) -> list[tuple[str, str]]:
    """Problems of the fields that shape a run (interval, count, limits, timeout)."""
    problems: list[tuple[str, str]] = []
    interval_problem = _seconds_problem(gate.interval_s, positive=False, high=MAX_INTERVAL_S)
    if interval_problem is not None:
        problems.append(("interval", interval_problem))
    if (why := _seconds_problem(gate.timeout_s, positive=True, high=MAX_TIMEOUT_S)) is not None:
        problems.append(("timeout", why))
    counts = (
        ("count", gate.count, 1, MAX_COUNT),
        ("failure_limit", gate.failure_limit, 0, MAX_COUNT),
        ("inconclusive_limit", gate.inconclusive_limit, 0, MAX_COUNT),
        ("consecutive_error_limit", gate.consecutive_error_limit, 0, MAX_ERROR_LIMIT),
    )
    whole = True
    for path, value, low, high in counts:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append((path, "must be a whole number"))
            whole = False
        elif not low <= value <= high:
            problems.append((path, f"must be within [{low}, {high}]"))
            whole = False
    if not whole:
        return problems
    # Argo Rollouts' rules: more tolerated failures than measurements would make the limit
    # meaningless, and repeated measurements need a pause between them.
    if gate.failure_limit > gate.count:
        problems.append(("failure_limit", f"must not exceed count ({gate.count})"))
    if gate.inconclusive_limit > gate.count:
        problems.append(("inconclusive_limit", f"must not exceed count ({gate.count})"))
    if gate.count > 1 and interval_problem is None and gate.interval_s == 0:
        problems.append(("interval", "must be more than 0 seconds when count is more than 1"))
    return problems


def check_gate(gate: PrometheusGate) -> list[tuple[str, str]]:
    """Every problem of `gate` as (field path, message), paths relative to the gate (`query`,
    `success_condition`, `interval`, ...); empty when the gate can be run."""
    problems: list[tuple[str, str]] = []
    if not _NAME.fullmatch(gate.name):
        problems.append(
            (
                "name",
                "must be 1-128 letters, digits, '.', '_' or '-', "
                "starting and ending with a letter or digit",
            )
        )
    if (why := address_problem(gate.address)) is not None:
        problems.append(("address", why))
    if (why := query_problem(gate.query)) is not None:
        problems.append(("query", why))
    if not gate.success_condition.strip():
        problems.append(("success_condition", "required: a CEL condition over `result`"))
    elif (why := condition_problem(gate.success_condition)) is not None:
        problems.append(("success_condition", why))
    if gate.failure_condition.strip() and (
        (why := condition_problem(gate.failure_condition)) is not None
    ):
        problems.append(("failure_condition", why))
    problems.extend(run_parameter_problems(gate))
    return problems
