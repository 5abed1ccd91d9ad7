"""One measurement of a gate: resolve the query, ask Prometheus, judge the result by the gate's
conditions, and record all of it as a `Measurement`."""

from __future__ import annotations

import datetime as dt
import enum
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from controlplane.analysis._gate import PrometheusGate, address_problem, resolve_query
from controlplane.analysis._prometheus import QueryFailed, has_nan, instant_query
from controlplane.policy import Expression, ExpressionError, compile_expression

log = logging.getLogger(__name__)

ResultValue = float | tuple[float, ...]
"""What conditions see as `result`: a tuple (a list in CEL) for a vector, a float for a scalar."""


class MeasurementVerdict(enum.StrEnum):
    """What one measurement says about the application (or that it could not be taken)."""

    PASSED = "passed"
    FAILED = "failed"
    INCONCLUSIVE = "inconclusive"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Measurement:
    """One query of a gate and its judgement, as stored with the plan and audited."""

    gate: str
    """The gate's name."""
    query: str
    """The query as sent, placeholders resolved (as written when they could not be)."""
    value: ResultValue | None
    """The numbers Prometheus answered; None when there was no answer."""
    condition: str
    """The condition(s) evaluated, as written; empty when none was (error, no data, NaN)."""
    verdict: MeasurementVerdict
    """passed, failed, inconclusive, or error (no usable answer: says nothing of the app)."""
    message: str
    """Why this verdict, in words."""
    started_at: dt.datetime
    """When the measurement began (UTC)."""
    finished_at: dt.datetime
    """When the verdict was reached (UTC)."""


@functools.lru_cache(maxsize=256)
def _compiled(source: str) -> Expression:
    return compile_expression(source)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _shown(value: ResultValue) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(f"{v:g}" for v in value) + "]"
    return f"{value:g}"


class _ConditionError(Exception):
    """A condition that does not compile, fails to evaluate, or gives no boolean."""


def _holds(field: str, source: str, value: ResultValue) -> bool:
    try:
        expression = _compiled(source)
    except ExpressionError as exc:
        raise _ConditionError(f"{field} `{source}` does not compile: {exc}") from None
    try:
        outcome = expression.evaluate(
            {"result": list(value) if isinstance(value, tuple) else value}
        )
    except ExpressionError as exc:
        raise _ConditionError(
            f"could not evaluate {field} `{source}` on result {_shown(value)}: {exc}"
        ) from None
    if not isinstance(outcome, bool):
        raise _ConditionError(
            f"{field} `{source}` gave {outcome!r} on result {_shown(value)}, not true or false"
        )
    return outcome


def judge(gate: PrometheusGate, value: ResultValue) -> tuple[MeasurementVerdict, str, str]:
    """(verdict, condition evaluated, message) for one result, by Argo Rollouts' rules.

    Argo's rules (its `EvaluateResult`), followed exactly once the result has numbers:
    a condition that cannot be evaluated, or is not a boolean, is an *error*; a true
    failure condition is *failed* (it wins over a true success condition); without a failure
    condition, a false success condition is *failed*; with one, both false is *inconclusive*;
    otherwise *passed*. Two additions of ours, made before any condition runs: an empty result
    (no series) and a NaN anywhere in it are *inconclusive* — no data is not evidence either
    way — where Argo would hand them to the conditions.
    """
    if value == ():
        return MeasurementVerdict.INCONCLUSIVE, "", "the query returned no series: no data"
    if has_nan(value):
        return (
            MeasurementVerdict.INCONCLUSIVE,
            "",
            f"the result {_shown(value)} holds NaN (e.g. a ratio over no traffic)",
        )
    success, failure = gate.success_condition, gate.failure_condition
    shown = _shown(value)
    if not failure.strip():
        try:
            succeeded = _holds("success_condition", success, value)
        except _ConditionError as exc:
            return MeasurementVerdict.ERROR, success, str(exc)
        if succeeded:
            return MeasurementVerdict.PASSED, success, f"result {shown}: success_condition holds"
        return (
            MeasurementVerdict.FAILED,
            success,
            f"result {shown}: success_condition `{success}` does not hold",
        )
    both = f"success: {success}; failure: {failure}"
    try:
        succeeded = _holds("success_condition", success, value)
        failed = _holds("failure_condition", failure, value)
    except _ConditionError as exc:
        return MeasurementVerdict.ERROR, both, str(exc)
    if failed:
        return (
            MeasurementVerdict.FAILED,
            both,
            f"result {shown}: failure_condition `{failure}` holds",
        )
    if succeeded:
        return (
            MeasurementVerdict.PASSED,
            both,
            f"result {shown}: success_condition holds and failure_condition does not",
        )
    return (
        MeasurementVerdict.INCONCLUSIVE,
        both,
        f"result {shown}: neither success_condition `{success}` nor failure_condition "
        f"`{failure}` holds",
    )


async def measure(gate: PrometheusGate, variables: Mapping[str, str]) -> Measurement:
    """Takes one measurement of `gate`, placeholders filled from `variables`; never raises for
    a failed query: that is a measurement with the *error* verdict and Prometheus's (or the
    network's) reason. Verdicts follow `judge`."""
    started = _now()

    def record(
        query: str,
        value: ResultValue | None,
        condition: str,
        verdict: MeasurementVerdict,
        message: str,
    ) -> Measurement:
        measurement = Measurement(
            gate.name, query, value, condition, verdict, message, started, _now()
        )
        log.info("gate %s: measurement %s: %s", gate.name, verdict, message)
        return measurement

    try:
        query = resolve_query(gate.query, variables)
    except ValueError as exc:
        return record(gate.query, None, "", MeasurementVerdict.ERROR, str(exc))
    if (why := address_problem(gate.address)) is not None:
        return record(query, None, "", MeasurementVerdict.ERROR, f"address {why}")
    try:
        answer = await instant_query(gate.address, query, gate.timeout_s)
    except QueryFailed as exc:
        return record(query, None, "", MeasurementVerdict.ERROR, str(exc))
    verdict, condition, message = judge(gate, answer.value)
    if answer.warnings:
        message += f" (Prometheus warned: {'; '.join(answer.warnings)})"
    return record(query, answer.value, condition, verdict, message)
