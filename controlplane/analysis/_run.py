"""A gate's run: measurements `interval_s` apart until `count` are taken or a limit is
exceeded, judged as Argo Rollouts judges a metric of an AnalysisRun."""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from controlplane.analysis._gate import (
    GateInvalid,
    PrometheusGate,
    resolve_query,
    run_parameter_problems,
)
from controlplane.analysis._measure import Measurement, MeasurementVerdict, measure

log = logging.getLogger(__name__)

ERROR_RETRY_INTERVAL_S = 10.0
"""Argo Rollouts retries a measurement that errored after 10 s; never later than the interval."""


class GateVerdict(enum.StrEnum):
    """What a gate's run says about the rollout step it followed."""

    PASSED = "passed"
    FAILED = "failed"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True, slots=True)
class GateOutcome:
    """The verdict of a gate's run, why, and every measurement it took, in order."""

    gate: str
    """The gate's name."""
    verdict: GateVerdict
    """passed, failed, or inconclusive (errors never fail a gate: they say nothing of the app)."""
    reason: str
    """A sentence a person can act on: which limit was exceeded, and by what."""
    measurements: tuple[Measurement, ...]
    """Every measurement taken, errors included."""


MeasurementCallback = Callable[[Measurement], Awaitable[None] | None]


async def run_gate(
    gate: PrometheusGate,
    variables: Mapping[str, str],
    *,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    on_measurement: MeasurementCallback | None = None,
) -> GateOutcome:
    """Runs `gate` to a verdict, by the rules of Argo Rollouts' `assessMetricStatus`:

    - after each measurement, more failed measurements than `failure_limit` fails the gate,
      more inconclusive ones than `inconclusive_limit` makes it inconclusive, and more errors in
      a row than `consecutive_error_limit` makes it inconclusive (Argo calls that phase Error;
      either way the application was not judged);
    - errors are retried: they do not count towards `count`, and a success, failure or
      inconclusive measurement resets the run of errors;
    - once `count` measurements are taken without exceeding a limit the gate passes, even if
      some failed (up to `failure_limit`).

    The next measurement starts `interval_s` after the previous one finished, or after
    `min(interval_s, 10 s)` when it errored (Argo waits 10 s whatever the interval). A query
    whose placeholders cannot be resolved makes the gate inconclusive at once: retrying
    cannot help. `on_measurement` sees each measurement as it is taken (to store and audit it;
    it may be a coroutine function, and what it raises ends the run). Raises GateInvalid if
    the count, limits, interval or timeout are out of range.
    """
    problems = run_parameter_problems(gate)
    if problems:
        raise GateInvalid(problems)
    measurements: list[Measurement] = []

    async def take() -> Measurement:
        measurement = await measure(gate, variables)
        measurements.append(measurement)
        if on_measurement is not None:
            delivered = on_measurement(measurement)
            if inspect.isawaitable(delivered):
                await delivered
        return measurement

    def outcome(verdict: GateVerdict, reason: str) -> GateOutcome:
        log.info("gate %s: %s: %s", gate.name, verdict, reason)
        return GateOutcome(gate.name, verdict, reason, tuple(measurements))

    try:
        resolve_query(gate.query, variables)
    except ValueError:
        last = await take()
        return outcome(
            GateVerdict.INCONCLUSIVE,
            f"the query cannot be run: {last.message}; nothing was asked of Prometheus",
        )

    taken = passed = failed = inconclusive = consecutive_errors = 0
    while True:
        last = await take()
        if last.verdict is MeasurementVerdict.ERROR:
            consecutive_errors += 1
        else:
            taken += 1
            consecutive_errors = 0
            if last.verdict is MeasurementVerdict.PASSED:
                passed += 1
            elif last.verdict is MeasurementVerdict.FAILED:
                failed += 1
            else:
                inconclusive += 1

        if failed > gate.failure_limit:
            return outcome(
                GateVerdict.FAILED,
                f"{failed} of {taken} measurements failed, more than failure_limit "
                f"({gate.failure_limit}) allows; the last: {last.message}",
            )
        if inconclusive > gate.inconclusive_limit:
            return outcome(
                GateVerdict.INCONCLUSIVE,
                f"{inconclusive} of {taken} measurements were inconclusive, more than "
                f"inconclusive_limit ({gate.inconclusive_limit}) allows; the last: {last.message}",
            )
        if consecutive_errors > gate.consecutive_error_limit:
            return outcome(
                GateVerdict.INCONCLUSIVE,
                f"{consecutive_errors} measurements in a row could not be taken, more than "
                f"consecutive_error_limit ({gate.consecutive_error_limit}) allows, so the "
                f"application was not judged; the last error: {last.message}",
            )
        if taken >= gate.count:
            return outcome(
                GateVerdict.PASSED,
                f"all {taken} measurements taken: {passed} passed, {failed} failed "
                f"(failure_limit {gate.failure_limit}), {inconclusive} inconclusive "
                f"(inconclusive_limit {gate.inconclusive_limit})",
            )
        pause = gate.interval_s
        if last.verdict is MeasurementVerdict.ERROR:
            pause = min(pause, ERROR_RETRY_INTERVAL_S)
        await sleep(pause)
