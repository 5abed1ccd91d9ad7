"""The stale-plan guard: records the state of every target a plan changes when the plan is
judged (at submission, again at approval), evaluates the plan's preconditions on it, and right
before each step checks that the targets have not drifted since and that the preconditions still
hold, so that a plan judged on one state never acts on another.

The state of a target is what its executor observes (`Executor.observe`): the fields the plan's
actions change, as text. A changed field fails the step unless one of the plan's `allow_drift`
glob patterns names it. After a step succeeded on a target, the target's recorded state is
observed again: the plan's own change is not drift for its later steps.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fnmatch
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from controlplane.executors import Executors, Target, TargetKind
from controlplane.plans._model import Plan, Precondition, Step, TargetState
from controlplane.policy import (
    Expression,
    ExpressionError,
    compile_expression,
    expression_problem,
)

log = logging.getLogger(__name__)

PRECONDITION_VARIABLES = frozenset({"target", "state", "sample"})
"""What a precondition sees: the target as plain data, its recorded fields (field name to value
as text) and, for a node, its newest telemetry sample as plain data (empty otherwise)."""

INFORMATIONAL_FIELDS = frozenset({"resource_version"})
"""Recorded and shown, never drift by themselves: a Kubernetes object's resourceVersion moves
with every status update (ready replicas, node heartbeats); a change of its spec moves
`generation`, which is compared."""

MAX_DRIFT_PATTERN = 256
_DRIFT_PATTERN = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no blanks
OBSERVATIONS_IN_PARALLEL = 8


class PreconditionFailed(Exception):
    """The targets' current state does not allow the plan: a precondition does not hold, or the
    state of a target cannot be recorded; `problems` lists (field path, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {message}" for path, message in problems))
        self.problems = problems


def precondition_expression_problem(source: str) -> str | None:
    """Why a precondition's expression cannot be used, or None."""
    return expression_problem(source, PRECONDITION_VARIABLES, "preconditions")


def drift_pattern_problem(pattern: str) -> str | None:
    """Why an `allow_drift` pattern cannot be used, or None."""
    if not pattern:
        return "empty pattern; use '*' to allow any drift"
    if len(pattern) > MAX_DRIFT_PATTERN:
        return f"at most {MAX_DRIFT_PATTERN} characters"
    if not _DRIFT_PATTERN.match(pattern):
        return "a glob over field names (e.g. 'gpu.*.power_limit_watts'): no blanks or controls"
    return None


def drift_allowed(field: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(field, pattern) for pattern in patterns)


def _now_text() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


class StateGuard:
    """Records target state and judges preconditions and drift for the desk (submission,
    approval) and the pipeline controller (before each step).

    `sample_data` gives a node's newest telemetry sample as plain data (None when it has sent
    none); `fresh`, where replicas relay telemetry, fetches it first. `observe_wait_s` bounds the
    wait for a target that cannot be observed yet (a node that has not sent telemetry) when a
    plan is judged (none by default: the plan is recorded without that target's state);
    `step_observe_wait_s` the same right before a step (e.g. after a restart of
    the control plane, until the node's agent reports again)."""

    def __init__(
        self,
        executors: Executors,
        *,
        sample_data: Callable[[str], Mapping[str, Any] | None] = lambda node_id: None,
        fresh: Callable[[Collection[str]], Awaitable[None]] | None = None,
        observe_wait_s: float = 0.0,
        step_observe_wait_s: float = 30.0,
        poll_interval_s: float = 0.1,
    ) -> None:
        self._executors = executors
        self._sample_data = sample_data
        self._fresh = fresh
        self._observe_wait_s = observe_wait_s
        self._step_observe_wait_s = step_observe_wait_s
        self._poll_interval_s = poll_interval_s
        self._compiled: dict[str, Expression] = {}

    # --- observation ------------------------------------------------------------------------

    async def _observe(self, step: Step, target: Target, until: float) -> dict[str, str]:
        """The target's fields that `step` changes; polls while it cannot be observed, and
        raises LookupError when it still cannot be at `until` (a monotonic instant)."""
        executor = self._executors.for_target(target)
        while True:
            try:
                return await executor.observe(step.action, step.parameters, target)
            except LookupError:
                if time.monotonic() + self._poll_interval_s > until:
                    raise
            await asyncio.sleep(self._poll_interval_s)

    async def record(self, plan: Plan) -> None:
        """Observes every target the plan changes into `plan.recorded_state` (the fields of
        several steps on one target merged) and evaluates the preconditions on every target.
        A target that cannot be observed now (a node that has sent no telemetry) is recorded
        without fields: there is nothing to compare, and the state it has right before its
        first step becomes the baseline; a precondition that reads its state does not hold.
        Raises PreconditionFailed naming `plan.preconditions[i]` for one that does not hold.
        Never waits: submission is a hot path, and the plan's own step checks again."""
        until = time.monotonic() + self._observe_wait_s
        nodes = {t.node_id for step in plan.steps for t in step.targets if t.node_id}
        if nodes and self._fresh is not None:
            await self._fresh(nodes)  # one round for all of them, where replicas relay
        gate = asyncio.Semaphore(OBSERVATIONS_IN_PARALLEL)

        async def one(step: Step, target: Target) -> dict[str, str]:
            try:
                if target.node_id:
                    return await self._observe(step, target, until)
                async with gate:  # a bounded GET each: a few at a time
                    return await self._observe(step, target, until)
            except LookupError as exc:
                log.debug("plan %s: %s not observed: %s", plan.plan_id, target.key, exc)
                return {}

        pairs = [(step, target) for step in plan.steps for target in step.targets]
        # Nodes one after the other (reads of memory: telemetry, the registry; a task per
        # target costs more than it saves); Kubernetes objects concurrently.
        observed = [await one(step, target) for step, target in pairs if target.node_id]
        observed += await asyncio.gather(
            *(one(step, target) for step, target in pairs if not target.node_id)
        )
        ordered = [t for _, t in pairs if t.node_id] + [t for _, t in pairs if not t.node_id]
        fields: dict[str, dict[str, str]] = {}
        for target, values in zip(ordered, observed, strict=True):
            if values:
                fields.setdefault(target.result_key, {}).update(values)
        at = _now_text()
        plan.recorded_state = {key: TargetState(key, values, at) for key, values in fields.items()}
        problems = await self._preconditions(plan, _targets_of(plan.steps), "does not hold")
        if problems:
            raise PreconditionFailed(problems)

    async def refresh(self, plan: Plan, step: Step) -> None:
        """After `step` succeeded: its targets' recorded fields become what they are now, so
        that the plan's own change is not drift for its later steps. A target that cannot be
        observed loses its recorded state (the next step on it takes its state then as the
        baseline)."""
        for target in step.targets:
            key = target.result_key
            executor = self._executors.for_target(target)
            try:
                now = await executor.observe(step.action, step.parameters, target)
            except LookupError as exc:
                log.warning("plan %s: state of %s not refreshed: %s", plan.plan_id, key, exc)
                plan.recorded_state.pop(key, None)
                continue
            if now:
                before = plan.recorded_state.get(key)
                merged = {**(before.fields if before else {}), **now}
                plan.recorded_state[key] = TargetState(key, merged, _now_text())

    # --- before a step ----------------------------------------------------------------------

    async def check_step(
        self,
        plan: Plan,
        step: Step,
        deadline: dt.datetime,
        targets: Sequence[Target] | None = None,
    ) -> str | None:
        """None when `step` may act on `targets` (default: all of its targets): none drifted
        from its recorded state (beyond what `allow_drift` allows) and every precondition holds
        on them; else why not."""
        targets = step.targets if targets is None else targets
        remaining = (deadline - dt.datetime.now(dt.UTC)).total_seconds()
        until = time.monotonic() + max(0.0, min(remaining, self._step_observe_wait_s))
        stale: list[str] = []
        current: dict[str, dict[str, str]] = {}
        for target in targets:
            key = target.result_key
            try:
                now = await self._observe(step, target, until)
            except LookupError as exc:
                stale.append(f"stale: the state of {key} cannot be observed: {exc}")
                continue
            recorded = plan.recorded_state.get(key)
            current[key] = {**(recorded.fields if recorded else {}), **now}
            if recorded is None:
                # Nothing was recorded (the target could not be observed when the plan was
                # judged, or the plan predates the guard): what it is now is the baseline.
                if now:
                    plan.recorded_state[key] = TargetState(key, dict(now), _now_text())
                continue
            for field, value in now.items():
                was = recorded.fields.get(field)
                if (
                    was is None
                    or was == value
                    or field in INFORMATIONAL_FIELDS
                    or drift_allowed(field, plan.allow_drift)
                ):
                    continue
                stale.append(f"stale: {key} {field} was {was} at validation, is {value} now")
        if stale:
            return "; ".join(stale)
        problems = await self._preconditions(plan, targets, "no longer holds", current)
        if problems:
            return "; ".join(message for _, message in problems)
        return None

    # --- preconditions ----------------------------------------------------------------------

    def _expression(self, precondition: Precondition) -> Expression:
        expression = self._compiled.get(precondition.expression)
        if expression is None:
            if len(self._compiled) > 1024:
                self._compiled.clear()
            expression = compile_expression(precondition.expression)
            self._compiled[precondition.expression] = expression
        return expression

    async def _preconditions(
        self,
        plan: Plan,
        targets: Sequence[Target],
        verdict: str,
        states: Mapping[str, Mapping[str, str]] | None = None,
    ) -> list[tuple[str, str]]:
        """(plan.preconditions[i], why) for each precondition that does not hold on a target:
        "precondition <name> <verdict> on <target>"; one that cannot be evaluated counts as
        not holding. `state` is the target's recorded fields, or its `states` entry."""
        if not plan.preconditions or not targets:
            return []
        nodes = [t.node_id for t in targets if t.kind == TargetKind.NODE]
        if nodes and self._fresh is not None:
            await self._fresh(nodes)
        activations = []
        for target in targets:
            recorded = plan.recorded_state.get(target.result_key)
            state = (
                states[target.result_key]
                if states is not None and target.result_key in states
                else (recorded.fields if recorded else {})
            )
            sample = self._sample_data(target.node_id) if target.kind == TargetKind.NODE else None
            activations.append(
                (
                    target,
                    {
                        "target": target.document(),
                        "state": dict(state),
                        "sample": dict(sample) if sample else {},
                    },
                )
            )
        problems: list[tuple[str, str]] = []
        for i, precondition in enumerate(plan.preconditions):
            at = f"plan.preconditions[{i}]"
            try:
                expression = self._expression(precondition)
            except ExpressionError as exc:  # validation refuses these; a stored one may not be
                problems.append((at, f"precondition {precondition.name} does not compile: {exc}"))
                continue
            for target, activation in activations:
                key = target.result_key
                try:
                    value = expression.evaluate(activation)
                except ExpressionError as exc:
                    problems.append(
                        (at, f"precondition {precondition.name} {verdict} on {key}: {exc}")
                    )
                    continue
                if value is not True:
                    problems.append((at, f"precondition {precondition.name} {verdict} on {key}"))
        return problems


def _targets_of(steps: Sequence[Step]) -> list[Target]:
    """Distinct targets over all steps, in first-touched order."""
    seen: dict[str, Target] = {}
    for step in steps:
        for target in step.targets:
            seen.setdefault(target.result_key, target)
    return list(seen.values())
