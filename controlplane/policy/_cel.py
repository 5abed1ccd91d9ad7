"""CEL through the `cel` package (Rust-backed `common-expression-language`): compiling with
readable syntax errors, evaluating with readable runtime errors, and finding the variables an
expression refers to."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import cel

# Names bound by comprehension macros (`list.all(x, ...)`): `Program.variables()` lists them
# alongside real variables, so they must not count as unknown.
_MACRO_BINDING = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")
_PARSE_LOCATION = re.compile(r"<input>:(\d+):(\d+):\s*(.*)")


class ExpressionError(ValueError):
    """A CEL expression that does not compile, or failed while evaluated; the message says why
    in words a rule author can act on."""


def _syntax_message(exc: Exception) -> str:
    text = str(exc)
    match = _PARSE_LOCATION.search(text)
    if match is None:
        return text.splitlines()[0] if text else type(exc).__name__
    line, column, detail = match.groups()
    return f"{detail.strip()} (line {line}, column {column})"


MAX_SOURCE_LENGTH = 10_000


def compile_program(source: str) -> cel.Program:
    """The compiled program; raises ExpressionError naming the syntax error and its place."""
    if not source.strip():
        raise ExpressionError("empty expression")
    if len(source) > MAX_SOURCE_LENGTH:
        # Found by tests/api_fuzz: the CEL library panics (PanicException) or aborts the whole
        # process on some sources of 65,537+ characters, so it never sees one this long.
        raise ExpressionError(f"longer than {MAX_SOURCE_LENGTH} characters")
    try:
        return cel.compile(source)
    except Exception as exc:
        raise ExpressionError(_syntax_message(exc)) from None


def free_variables(program: cel.Program, source: str) -> set[str]:
    """Top-level variables `source` refers to (comprehension variables excluded)."""
    return set(program.variables()) - set(_MACRO_BINDING.findall(source))


def describe_error(exc: BaseException) -> str:
    """A runtime failure of a CEL program, in words (the library raises bare KeyError etc.)."""
    if isinstance(exc, KeyError):
        return f"no such key {exc.args[0]!r}" if exc.args else "no such key"
    if isinstance(exc, IndexError):
        return str(exc) or "index out of range"
    if isinstance(exc, ZeroDivisionError):
        return "division by zero"
    if isinstance(exc, (TypeError, RuntimeError, ValueError)):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def to_context(variables: Mapping[str, Any]) -> cel.Context:
    """Converts Python values to the library's once, so many programs can run over them."""
    try:
        return cel.Context(dict(variables))
    except Exception as exc:
        raise ExpressionError(f"cannot convert the variables to CEL values: {exc}") from None


class Expression:
    """A compiled CEL expression (e.g. a plan's health gate over telemetry)."""

    __slots__ = ("_program", "source")

    def __init__(self, source: str, program: cel.Program) -> None:
        self.source = source
        self._program = program

    @property
    def variables(self) -> set[str]:
        return free_variables(self._program, self.source)

    def evaluate(self, activation: Mapping[str, Any]) -> Any:
        """The value of the expression over `activation` (Python values: dicts, lists, numbers,
        strings, UTC datetimes, timedeltas, None); raises ExpressionError."""
        context = to_context(activation)
        try:
            return self._program.execute(context)
        except Exception as exc:
            raise ExpressionError(describe_error(exc)) from None

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


def compile_expression(source: str) -> Expression:
    """Compiles `source` once for many evaluations; raises ExpressionError."""
    return Expression(source, compile_program(source))


@functools.lru_cache(maxsize=1024)
def expression_problem(source: str, allowed: frozenset[str], users: str) -> str | None:
    """Why `source` cannot be used where only the variables `allowed` exist, or None; `users`
    names who may use them in the message ("health gates"). Remembered per source: planners
    send the same expressions again and again, and compiling one costs about 100 µs."""
    try:
        expression = compile_expression(source)
    except ExpressionError as exc:
        return str(exc)
    unknown = sorted(expression.variables - allowed)
    if unknown:
        return (
            f"unknown variable(s) {', '.join(unknown)}; {users} may use "
            f"{', '.join(sorted(allowed))}"
        )
    return None
