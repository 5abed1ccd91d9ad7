"""The pipeline controller: a level-triggered reconcile loop over stored plans.

Each pass reads what the store says (not what memory remembers) and moves every active plan
forward by idempotent steps: every run has an identity derived from (plan, step, target), so a
controller killed at any point and started again attaches to the runs already started and never
starts one twice. Steps are carried out by executors chosen by each target's kind; the
controller knows only their protocol (`controlplane.executors.Executor`). Only the holder of the
controller lease acts, and each of its writes is fenced by the lease epoch. Failures (a target,
a health gate, the deadline, a cancel) roll back the changes already made, in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from controlplane.analysis import GateVerdict, Measurement, run_gate
from controlplane.executors import Executors, StepRun, Target
from controlplane.plans._autonomy import AutonomyGuard
from controlplane.plans._budgets import DisruptionBudgets, WaveWait, wait_for_wave
from controlplane.plans._drift import StateGuard
from controlplane.plans._gates import HealthGates
from controlplane.plans._lease import Lease, LeaseLost
from controlplane.plans._model import (
    AnalysisRecord,
    MetricSummary,
    NodeResult,
    Phase,
    Plan,
    PredictionResult,
    Step,
    StepState,
)
from controlplane.plans._predictions import (
    HISTORY_S,
    PredictionChecker,
    TelemetryHistory,
    prediction_verdicts,
)
from controlplane.plans._repository import PlanConflict, PlanNotFound, PlanRepository
from processkit import log_context, wait_event

log = logging.getLogger(__name__)

ACTOR = "pipeline-controller"

_TRACER = trace.get_tracer(__name__)
_TRACE_CONTEXT = TraceContextTextMapPropagator()
_UNSUCCESSFUL = frozenset({Phase.FAILED, Phase.ROLLED_BACK})
# How often the holds of finished plans are swept.
_BUDGET_SWEEP_S = 30.0


def _submission_context(plan: Plan) -> Context:
    """The context a plan's execution spans continue: its submission's, as stored with it
    (on whichever replica submitted it); an empty one (a new trace) for a plan submitted
    untraced, never whatever happened to be current when the controller woke."""
    return _TRACE_CONTEXT.extract(plan.trace_context, context=Context())


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class PipelineController:
    """Drives approved plans to a terminal phase while holding the controller lease: runs
    each step in waves through the executors, checks health gates, rolls back on failure."""

    def __init__(
        self,
        repository: PlanRepository,
        lease: Lease,
        executors: Executors,
        gates: HealthGates[Any],
        *,
        interval_s: float = 1.0,
        on_step_finished: Callable[[str, str, float], None] | None = None,
        on_phase_counts: Callable[[dict[str, int]], None] | None = None,
        on_measurement: Callable[[Plan, AnalysisRecord], Awaitable[None]] | None = None,
        predictions: PredictionChecker | None = None,
        history: TelemetryHistory | None = None,
        on_prediction: Callable[[str, str], None] | None = None,
        agent_on_kubernetes_node: Callable[[str], str | None] = lambda name: None,
        autonomy: AutonomyGuard | None = None,
        budgets: DisruptionBudgets | None = None,
        guard: StateGuard | None = None,
    ) -> None:
        self._guard = guard
        self._budgets = budgets
        self._budget_sweep_at = 0.0
        self._autonomy = autonomy
        self._repository = repository
        self._lease = lease
        self._executors = executors
        self._gates = gates
        self._interval_s = interval_s
        self._on_step_finished = on_step_finished
        self._on_phase_counts = on_phase_counts
        self._on_measurement = on_measurement
        self._predictions = predictions
        self._history = history
        self._on_prediction = on_prediction
        self._pause_lock = asyncio.Lock()
        self._agent_on_kubernetes_node = agent_on_kubernetes_node
        self._wake = asyncio.Event()
        self._driving: dict[str, asyncio.Task[None]] = {}

    @property
    def leader(self) -> bool:
        return self._lease.fence is not None

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Runs until cancelled: holds (or waits for) the lease and reconciles."""
        try:
            while True:
                fence = await self._lease.acquire_or_renew()
                if fence is None:
                    self._stop_driving()
                else:
                    await self.reconcile()
                if self._on_phase_counts is not None:
                    self._on_phase_counts(await self._repository.count_by_phase())
                with contextlib.suppress(TimeoutError):
                    await wait_event(self._wake, self._interval_s)
                self._wake.clear()
        finally:
            self._stop_driving()
            if self._driving:
                await asyncio.gather(*self._driving.values(), return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._lease.release()

    def _stop_driving(self) -> None:
        for task in self._driving.values():
            task.cancel()

    async def reconcile(self) -> None:
        """One pass: expire plans that never started, drive every active plan."""
        now = _utcnow()
        if self._budgets and time.monotonic() >= self._budget_sweep_at:
            # Holds of plans that ended without releasing them (a controller killed mid-wave).
            self._budget_sweep_at = time.monotonic() + _BUDGET_SWEEP_S
            await self._budgets.sweep()
        for plan_id in await self._repository.expiring_plan_ids(now):
            await self._expire(plan_id, now)
        for plan_id in await self._repository.active_plan_ids():
            task = self._driving.get(plan_id)
            if task is None or task.done():
                self._driving[plan_id] = asyncio.create_task(
                    self._drive_logged(plan_id), name=f"plan:{plan_id}"
                )
        for plan_id, task in list(self._driving.items()):
            if task.done():
                del self._driving[plan_id]

    async def _expire(self, plan_id: str, now: dt.datetime) -> None:
        try:
            plan = await self._repository.get(plan_id)
            if plan.phase.terminal or plan.phase == Phase.EXECUTING:
                return
            expired = plan.expire_at.isoformat() if plan.expire_at else "?"
            plan.status_message = f"expired at {expired} before it started"
            await self._repository.save(
                plan,
                to_phase=Phase.CANCELLED,
                actor=ACTOR,
                reason=plan.status_message,
                fence=self._lease.fence,
            )
        except (PlanConflict, PlanNotFound, LeaseLost) as exc:
            log.info("expiring plan %s: %s", plan_id, exc)

    async def _drive_logged(self, plan_id: str) -> None:
        with log_context(plan_id=plan_id):
            try:
                await self._drive(plan_id)
            except (LeaseLost, PlanConflict) as exc:
                log.info("plan %s: stopped driving (%s); the next pass resumes it", plan_id, exc)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("plan %s: reconcile failed; retrying on the next pass", plan_id)

    async def _save(self, plan: Plan, to: Phase | None = None, reason: str = "") -> Plan:
        fence = self._lease.fence
        if fence is None:
            raise LeaseLost("no lease")
        saved = await self._repository.save(
            plan, to_phase=to, actor=ACTOR, reason=reason, fence=fence
        )
        # Keep working on the same object: the loops below hold references into its steps.
        plan.phase, plan.version = saved.phase, saved.version
        plan.updated_at, plan.transitions = saved.updated_at, saved.transitions
        return plan

    async def _drive(self, plan_id: str) -> None:
        plan = await self._repository.get(plan_id)
        with _TRACER.start_as_current_span(
            "plan.execute",
            context=_submission_context(plan),
            attributes={
                "sentinel.plan.id": plan.plan_id,
                "sentinel.plan.phase": plan.phase.value,
                "sentinel.controller": self._lease.holder,
            },
        ) as span:
            try:
                plan = await self._drive_phases(plan)
            finally:
                if self._budgets and plan.phase.terminal:
                    await self._budgets.release(plan.plan_id)
            span.set_attribute("sentinel.plan.final_phase", plan.phase.value)
            if plan.phase in _UNSUCCESSFUL:
                span.set_status(Status(StatusCode.ERROR, plan.status_message))

    async def _drive_phases(self, plan: Plan) -> Plan:
        """Moves the plan through its phases until it is terminal (or no longer this
        controller's to drive); returns it as it was left."""
        plan_id = plan.plan_id
        while not plan.phase.terminal:
            if plan.phase == Phase.APPROVED:
                if plan.expire_at is not None and plan.expire_at <= _utcnow():
                    await self._expire(plan_id, _utcnow())
                    return plan
                plan.started_at = _utcnow()
                plan.telemetry_before = await self._telemetry_summaries(
                    plan, plan.started_at - dt.timedelta(seconds=HISTORY_S), plan.started_at
                )
                plan = await self._save(plan, Phase.EXECUTING, "execution started")
            elif plan.phase in (Phase.EXECUTING, Phase.PAUSED):
                # A plan found PAUSED (after a restart) goes on running its step: the run is
                # repeatable, and its analysis point waits for the operator again.
                plan = await self._execute(plan)
            elif plan.phase == Phase.ROLLING_BACK:
                with _TRACER.start_as_current_span(
                    "plan.rollback", attributes={"sentinel.plan.id": plan_id}
                ) as span:
                    plan = await self._roll_back(plan)
                    if plan.phase != Phase.ROLLED_BACK:
                        span.set_status(Status(StatusCode.ERROR, plan.status_message))
            else:
                return plan
        return plan

    # --- execution --------------------------------------------------------------------------

    def _deadline_passed(self, plan: Plan) -> bool:
        if not plan.limits.deadline_s or plan.started_at is None:
            return False
        return _utcnow() > plan.started_at + dt.timedelta(seconds=plan.limits.deadline_s)

    def _command_deadline(self, plan: Plan, step: Step) -> dt.datetime:
        deadline = _utcnow() + dt.timedelta(seconds=step.timeout_s)
        if plan.limits.deadline_s and plan.started_at is not None:
            deadline = min(deadline, plan.started_at + dt.timedelta(seconds=plan.limits.deadline_s))
        return deadline

    async def _execute(self, plan: Plan) -> Plan:
        for step in plan.steps:
            if step.state == StepState.SUCCEEDED:
                continue
            if plan.cancel_requested:
                return await self._fail(plan, step, plan.cancel_requested)
            if self._deadline_passed(plan):
                return await self._fail(plan, step, "the plan's deadline passed")
            with _TRACER.start_as_current_span(
                "plan.step",
                attributes={
                    "sentinel.plan.id": plan.plan_id,
                    "sentinel.step.index": step.index,
                    "sentinel.step.id": step.step_id,
                    "sentinel.step.action": step.action,
                    "sentinel.step.targets": len(step.targets),
                },
            ) as span:
                ended = await self._execute_step(plan, step)
                span.set_attribute("sentinel.step.state", step.state.value)
                if step.state == StepState.FAILED:
                    span.set_status(Status(StatusCode.ERROR, step.message))
            if ended is not None:
                return ended
        return await self._finish(plan)

    async def _finish(self, plan: Plan) -> Plan:
        """After the last step: checks the plan's predictions (each verdict saved as it comes,
        so a restarted controller judges only the undecided ones, with what is left of their
        windows), summarises the telemetry since the last step, then completes the plan, or
        rolls it back for a missed prediction that says so."""
        if plan.steps_finished_at is None:
            plan.steps_finished_at = _utcnow()
            await self._save(plan)
        nodes = await self._telemetry_nodes(plan)
        decided = {result.name for result in plan.prediction_results}
        pending = [p for p in plan.predictions if p.name not in decided]

        async def keep(result: PredictionResult) -> None:
            plan.prediction_results.append(result)
            log.info("plan %s: %s", plan.plan_id, result.message)
            await self._save(plan)
            if self._on_prediction is not None:
                self._on_prediction(plan.source, result.verdict.value)

        async def cancelled() -> bool:
            stored = await self._repository.get(plan.plan_id)
            if stored.cancel_requested and not plan.cancel_requested:
                plan.cancel_requested = stored.cancel_requested
                plan.status_message = stored.status_message
                plan.version = stored.version
            return bool(plan.cancel_requested)

        if pending and not plan.cancel_requested:
            checker = self._predictions or PredictionChecker(lambda node: None, lambda p: {})
            if self._history is not None:
                self._history.watch(nodes)  # every sample of the after window counts
            try:
                await checker.verify(
                    pending,
                    nodes,
                    finished_at=plan.steps_finished_at,
                    plan_confidence=plan.confidence,
                    decided=keep,
                    stop=cancelled,
                    stop_interval_s=self._interval_s,
                )
            finally:
                if self._history is not None:
                    self._history.unwatch(nodes)
        plan.telemetry_after = await self._telemetry_summaries(
            plan, plan.steps_finished_at, _utcnow(), nodes
        )
        if plan.cancel_requested:
            return await self._fail(plan, None, plan.cancel_requested)
        missed, roll_back = prediction_verdicts(plan.predictions, plan.prediction_results)
        if roll_back:
            return await self._fail(plan, None, "; ".join(roll_back))
        plan.status_message = "; ".join(["all steps succeeded", *missed])
        return await self._save(plan, Phase.COMPLETED, plan.status_message)

    async def _telemetry_nodes(self, plan: Plan) -> list[str]:
        """The agents whose telemetry the plan's predictions and outcome are about: its node
        targets, and the agents of the Kubernetes nodes its workloads' pods run on."""
        nodes: dict[str, None] = dict.fromkeys(plan.node_ids)
        for step in plan.steps:
            workloads = [target for target in step.targets if not target.node_id]
            if workloads:
                agents, _ = await self._agents_of(plan, step, workloads)
                nodes.update(dict.fromkeys(agents))
        return list(nodes)

    async def _telemetry_summaries(
        self,
        plan: Plan,
        start: dt.datetime,
        end: dt.datetime,
        nodes: Sequence[str] | None = None,
    ) -> dict[str, dict[str, MetricSummary]]:
        """Per node target, its summary metrics over the samples that arrived in the window."""
        if self._history is None:
            return {}
        if nodes is None:
            nodes = await self._telemetry_nodes(plan)
        return {f"node/{node}": self._history.summaries(node, start, end) for node in nodes}

    async def _execute_step(self, plan: Plan, step: Step) -> Plan | None:
        """Runs one step wave by wave, each wave followed by the gates; None when it
        succeeded (and is saved), else the plan as its failure left it."""
        started = time.monotonic()
        # A step found RUNNING is resumed (after a restart): the first wave with targets not
        # yet recorded may have been in flight, its changes made but their results not stored.
        resuming = step.state == StepState.RUNNING
        if step.state != StepState.RUNNING:
            step.state = StepState.RUNNING
            await self._save(plan)
        size = max(plan.limits.max_nodes_in_parallel, 1)
        targets = step.targets
        for first in range(0, len(targets), size):
            wave = targets[first : first + size]
            if (held := await self._hold_for_autonomy(plan)) is not None:
                return await self._fail(plan, step, held)
            if (refused := await self._hold_budgets(plan, step, wave)) is not None:
                return await self._fail(plan, step, refused)
            untouched = [t for t in wave if step.result_for(t.result_key) is None]
            if resuming and untouched:
                resuming = False  # possibly in flight: its changes are the plan's own
            elif (stale := await self._stale(plan, step, untouched)) is not None:
                if self._budgets:
                    await self._budgets.release(plan.plan_id)
                return await self._fail(plan, step, stale)
            with _TRACER.start_as_current_span(
                "plan.wave",
                attributes={
                    "sentinel.plan.id": plan.plan_id,
                    "sentinel.step.index": step.index,
                    "sentinel.wave.index": first // size,
                    "sentinel.wave.targets": [t.key for t in wave],
                },
            ) as span:
                try:
                    problem = await self._execute_wave(
                        plan, step, wave, f"after wave {first // size}"
                    )
                finally:
                    # Kept until the wave's gates are judged: its nodes are being changed.
                    if self._budgets:
                        await self._budgets.release(plan.plan_id)
                if problem is not None:
                    span.set_status(Status(StatusCode.ERROR, problem[1]))
            if problem is not None:
                result, why = problem
                if result:
                    self._step_finished(step, result, started)
                return await self._fail(plan, step, why)
        if self._guard is not None:
            await self._guard.refresh(plan, step)  # saved with the step's success below
        step.state = StepState.SUCCEEDED
        step.message = _done_message(targets)
        self._step_finished(step, "succeeded", started)
        await self._save(plan)
        return None

    async def _stale(self, plan: Plan, step: Step, untouched: Sequence[Target]) -> str | None:
        """The stale-plan guard (_drift.py) on a wave's targets not yet started, right before
        they are changed (after any wait for a disruption budget): None when they may be; else
        why not (a target changed since the plan was judged, or a precondition no longer
        holds). Targets already started are not passed: their change is the plan's own."""
        if self._guard is None or not untouched:
            return None
        deadline = self._command_deadline(plan, step)
        return await self._guard.check_step(plan, step, deadline, untouched)

    async def _execute_wave(
        self, plan: Plan, step: Step, wave: Sequence[Target], point: str
    ) -> tuple[str, str] | None:
        """Runs the wave's targets not yet done and judges the gates after them; None when the
        step may go on, else (the step's result for the metric, or "" for none; why not)."""
        todo = [
            t
            for t in wave
            if (r := step.result_for(t.result_key)) is None
            or r.state in (StepState.PENDING, StepState.RUNNING)
        ]
        if todo:
            results = await self._run_wave(plan, step, todo)
            for result in results:
                existing = step.result_for(result.node_id)
                if existing is None:
                    step.node_results.append(result)
                else:
                    step.node_results[step.node_results.index(existing)] = result
            await self._save(plan)
        if plan.cancel_requested:
            return "", plan.cancel_requested
        failed = [
            r for t in wave if (r := step.result_for(t.result_key)) and r.state == StepState.FAILED
        ]
        if failed:
            why = "; ".join(f"{r.node_id}: {r.outcome} {r.message}".strip() for r in failed)
            return "failed", f"step {step.step_id} failed on {why}"
        gate_problem = await self._judge(plan, step, wave, point)
        if gate_problem is not None:
            return "gate_failed", f"step {step.step_id}: {gate_problem}"
        if self._deadline_passed(plan):
            return "", "the plan's deadline passed"
        return None

    async def _run_wave(self, plan: Plan, step: Step, wave: list[Target]) -> list[NodeResult]:
        """Runs one wave, watching the store for a cancel meanwhile: on a cancel, commands no
        agent has received yet are withdrawn, and the ones already delivered are awaited (they
        may be executing, and rollback must know what they did)."""
        runs = [self._step_run(plan, step, target) for target in wave]
        tasks = [asyncio.create_task(self._do(run)) for run in runs]
        try:
            pending: set[asyncio.Task[NodeResult]] = set(tasks)
            while pending:
                _, pending = await asyncio.wait(pending, timeout=self._interval_s)
                if not pending or plan.cancel_requested:
                    continue
                stored = await self._repository.get(plan.plan_id)
                if not stored.cancel_requested:
                    continue
                # The cancel is the only change the API makes to a running plan: adopt it.
                plan.cancel_requested = stored.cancel_requested
                plan.status_message = stored.status_message
                plan.version = stored.version
                for run, task in zip(runs, tasks, strict=True):
                    if not task.done():
                        await self._executors.for_target(run.target).withdraw(run)
            return [task.result() for task in tasks]
        finally:
            for task in tasks:
                task.cancel()

    def _step_finished(self, step: Step, result: str, started: float) -> None:
        if self._on_step_finished is not None:
            self._on_step_finished(step.action, result, time.monotonic() - started)

    def _step_run(self, plan: Plan, step: Step, target: Target) -> StepRun:
        return StepRun(
            plan_id=plan.plan_id,
            step_index=step.index,
            action=step.action,
            parameters=step.parameters,
            target=target,
            deadline=self._command_deadline(plan, step),
            analyze=lambda point: self._analyze(plan, step, target, point),
        )

    async def _analyze(self, plan: Plan, step: Step, target: Target, point: str) -> str | None:
        """The plan's gates at one point of a progressive run: None when it may go on."""
        if plan.cancel_requested:  # adopted from the store while the wave runs
            return f"cancelled: {plan.cancel_requested}"
        problem = await self._judge(plan, step, [target], point)
        return None if problem is None else f"step {step.step_id} at {point}: {problem}"

    async def _judge(
        self, plan: Plan, step: Step, targets: Sequence[Target], point: str
    ) -> str | None:
        """Runs the plan's gates for `targets`: telemetry gates on the nodes' fresh samples,
        Prometheus gates per target (each measurement kept with the plan). None when all pass;
        else why not. Missing data is inconclusive, never a pass."""
        telemetry = tuple(g for g in plan.health_gates if g.prometheus is None)
        if telemetry:
            nodes, unknown = await self._agents_of(plan, step, targets)
            if unknown:
                names = ", ".join(gate.name for gate in telemetry)
                return f"health gate(s) {names} inconclusive: {'; '.join(unknown)}"
            problem = await self._gates.check(telemetry, nodes, point=point)
            if problem is not None:
                return problem
        for gate in plan.health_gates:
            if gate.prometheus is None:
                continue
            for target in targets:

                async def keep(measurement: Measurement, target: Target = target) -> None:
                    record = _analysis_record(measurement, step, target, point)
                    plan.measurements.append(record)
                    if self._on_measurement is not None:
                        await self._on_measurement(plan, record)

                with _TRACER.start_as_current_span(
                    "gate",
                    attributes={
                        "sentinel.gate.name": gate.name,
                        "sentinel.gate.kind": "prometheus",
                        "sentinel.gate.point": point,
                        "sentinel.gate.target": target.key,
                    },
                ) as span:
                    outcome = await run_gate(
                        gate.prometheus, _gate_variables(plan, target), on_measurement=keep
                    )
                    span.set_attribute("sentinel.gate.verdict", outcome.verdict.value)
                    if outcome.verdict != GateVerdict.PASSED:
                        span.set_status(Status(StatusCode.ERROR, outcome.reason))
                where = f"analysis gate {gate.name!r} {outcome.verdict.value} on {target.key}"
                if outcome.verdict == GateVerdict.INCONCLUSIVE and gate.pause_on_inconclusive:
                    ended = await self._pause(
                        plan, f"{where} ({point}): {outcome.reason}", gate.pause_timeout_s
                    )
                    if ended is None:
                        continue  # an operator let it go on
                    return f"{where} ({point}): {outcome.reason}; {ended}"
                if outcome.verdict != GateVerdict.PASSED:
                    return (
                        f"analysis gate {gate.name!r} {outcome.verdict.value} on {target.key} "
                        f"({point}): {outcome.reason}"
                    )
        return None

    async def _hold_for_autonomy(self, plan: Plan) -> str | None:
        """Before a wave: a planner plan pauses while the autonomy breaker is tripped (an
        operator's approve resumes it); None when it may go on, else why it must roll back."""
        if self._autonomy is None or (why := self._autonomy.wave_hold(plan)) is None:
            return None
        plan.waiting_reason = why
        ended = await self._pause(plan, why, self._autonomy.pause_timeout_s)
        plan.waiting_reason = ""
        return ended

    async def _hold_budgets(self, plan: Plan, step: Step, wave: Sequence[Target]) -> str | None:
        """Before a wave: takes the disruption budgets' holds on its nodes, waiting while a
        budget is used up; None when taken, else why the plan must fail."""
        if not self._budgets:
            return None

        async def refresh() -> str:
            stored = await self._repository.get(plan.plan_id)
            plan.version, plan.cancel_requested = stored.version, stored.cancel_requested
            if plan.cancel_requested:
                return plan.cancel_requested
            if self._lease.fence is None:
                raise LeaseLost("no lease")
            return "the plan's deadline passed" if self._deadline_passed(plan) else ""

        async def save() -> None:
            await self._save(plan)

        how = WaveWait(refresh, save, lambda: self._lease.fence)
        return await wait_for_wave(self._budgets, plan, step, wave, how)

    async def _pause(self, plan: Plan, why: str, timeout_s: float) -> str | None:
        """Pauses the plan for an operator; None when one resumed it (approve), else why the
        pause ended without that (a cancel, or the timeout), with the plan EXECUTING again and
        its cancel set, so that it rolls back."""
        async with self._pause_lock:
            if plan.phase != Phase.PAUSED:
                plan.paused_until = _utcnow() + dt.timedelta(seconds=timeout_s)
                plan.status_message = f"paused for an operator: {why}"
                await self._save(plan, Phase.PAUSED, plan.status_message)
        while True:
            stored = await self._repository.get(plan.plan_id)
            async with self._pause_lock:
                _adopt(plan, stored)
                if plan.phase != Phase.PAUSED:
                    return None
                ended = ""
                if plan.cancel_requested:
                    ended = f"pause ended: {plan.cancel_requested}"
                elif plan.paused_until is not None and _utcnow() >= plan.paused_until:
                    ended = f"pause timed out after {timeout_s:g} s without an operator"
                    plan.cancel_requested = ended
                if ended:
                    plan.paused_until = None
                    await self._save(plan, Phase.EXECUTING, ended)
                    return ended
            await asyncio.sleep(self._interval_s)

    async def _agents_of(
        self, plan: Plan, step: Step, targets: Sequence[Target]
    ) -> tuple[list[str], list[str]]:
        """The agents whose telemetry judges `targets` (a node's own agent; for a workload, the
        agents of the Kubernetes nodes its pods run on), and why some could not be found."""
        agents: dict[str, None] = {}
        unknown: list[str] = []
        for target in targets:
            if target.node_id:
                agents.setdefault(target.node_id, None)
                continue
            try:
                placed = await self._executors.for_target(target).placement(
                    target, self._command_deadline(plan, step)
                )
            except LookupError as exc:
                unknown.append(str(exc))
                continue
            if not placed:
                unknown.append(f"{target.key} has no pods on any node")
            for kubernetes_node in placed:
                agent = self._agent_on_kubernetes_node(kubernetes_node)
                if agent is None:
                    unknown.append(f"no agent reports being Kubernetes node {kubernetes_node}")
                else:
                    agents.setdefault(agent, None)
        return list(agents), unknown

    async def _do(self, run: StepRun) -> NodeResult:
        outcome = await self._executors.for_target(run.target).run(run)
        return NodeResult(
            run.target.result_key,
            StepState.SUCCEEDED if outcome.succeeded else StepState.FAILED,
            command_id=outcome.reference,
            outcome=outcome.outcome,
            message=outcome.message,
            output=dict(outcome.output),
        )

    async def _fail(self, plan: Plan, step: Step | None, reason: str) -> Plan:
        if step is not None:  # None: the plan failed after its steps (a missed prediction)
            step.state = StepState.FAILED
            step.message = reason
        plan.status_message = reason
        log.warning("plan %s: %s", plan.plan_id, reason)
        if any(r.state == StepState.SUCCEEDED for s in plan.steps for r in s.node_results):
            return await self._save(plan, Phase.ROLLING_BACK, reason)
        return await self._save(plan, Phase.FAILED, f"{reason}; nothing to roll back")

    # --- rollback ---------------------------------------------------------------------------

    async def _roll_back(self, plan: Plan) -> Plan:
        failures: list[str] = []
        for step in reversed(plan.steps):
            touched = False
            targets = {target.result_key: target for target in step.targets}
            for result in reversed(step.node_results):
                if result.state != StepState.SUCCEEDED:
                    if result.rollback_outcome and result.rollback_outcome != "SUCCEEDED":
                        failures.append(f"{result.node_id}: {result.rollback_outcome}")
                    continue
                touched = True
                target = targets[result.node_id]
                executor = self._executors.for_target(target)
                undo = executor.undo(step.action, step.parameters, result.output)
                if undo is None:
                    result.state = StepState.ROLLED_BACK
                    result.rollback_outcome = "NOTHING_TO_UNDO"
                else:
                    undone = await executor.run(
                        StepRun(
                            plan_id=plan.plan_id,
                            step_index=step.index,
                            action=undo.action,
                            parameters=undo.parameters,
                            target=target,
                            deadline=_utcnow() + dt.timedelta(seconds=step.timeout_s),
                            undo=True,
                        )
                    )
                    result.rollback_command_id = undone.reference
                    result.rollback_outcome = undone.outcome
                    if undone.succeeded:
                        result.state = StepState.ROLLED_BACK
                    else:
                        # Left SUCCEEDED would retry forever; the failure is recorded instead.
                        result.state = StepState.FAILED
                        result.message = f"rollback {undo.action} failed: {undone.message}"
                        failures.append(f"{result.node_id}: {undone.outcome} {undone.message}")
                await self._save(plan)
            if touched and step.state != StepState.FAILED:
                step.state = StepState.ROLLED_BACK
                plan = await self._save(plan)
        if failures:
            reason = "rollback incomplete: " + "; ".join(failures)
            plan.status_message = f"{plan.status_message}; {reason}"
            return await self._save(plan, Phase.FAILED, reason)
        return await self._save(plan, Phase.ROLLED_BACK, f"rolled back: {plan.status_message}")


def _done_message(targets: Sequence[Target]) -> str:
    nodes = sum(1 for target in targets if target.node_id)
    if nodes == len(targets):
        return f"done on {nodes} node(s)"
    return f"done on {len(targets)} target(s)"


def _gate_variables(plan: Plan, target: Target) -> dict[str, str]:
    """What a Prometheus gate's placeholders stand for, for one target."""
    k = target.kubernetes
    if k is not None:
        return {
            "namespace": k.namespace,
            "name": k.name,
            "cluster": k.cluster,
            "plan_id": plan.plan_id,
        }
    return {"name": target.node_id, "plan_id": plan.plan_id}


def _plain_number(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return value


def _analysis_record(
    measurement: Measurement, step: Step, target: Target, point: str
) -> AnalysisRecord:
    value: Any = measurement.value
    if isinstance(value, tuple):
        value = [_plain_number(v) for v in value]
    elif isinstance(value, float):
        value = _plain_number(value)
    return AnalysisRecord(
        gate=measurement.gate,
        step_index=step.index,
        target=target.key,
        point=point,
        query=measurement.query,
        value=value,
        condition=measurement.condition,
        verdict=measurement.verdict.value.upper(),
        message=measurement.message,
        started_at=measurement.started_at.isoformat(),
        finished_at=measurement.finished_at.isoformat(),
    )


def _adopt(plan: Plan, stored: Plan) -> None:
    """Takes what the API may change on a running plan (approve/cancel of a pause)."""
    plan.phase, plan.version = stored.phase, stored.version
    plan.transitions, plan.updated_at = stored.transitions, stored.updated_at
    plan.cancel_requested = stored.cancel_requested
    plan.paused_until = stored.paused_until
    plan.status_message = stored.status_message
