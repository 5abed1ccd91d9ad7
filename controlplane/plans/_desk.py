"""The plan desk: what callers can do with plans — submit (validate, check policy, store),
read, watch, approve and cancel. Execution belongs to the pipeline controller; the gRPC face
of this desk is `controlplane.api.PlanService`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from controlplane.executors import Executors, FieldChange, StepRun, Target
from controlplane.plans._autonomy import BREAKER_RULE_ID, AutonomyGuard
from controlplane.plans._drift import PreconditionFailed, StateGuard
from controlplane.plans._gates import gate_expression_problem
from controlplane.plans._model import (
    Phase,
    Plan,
    Step,
    Transition,
    Violation,
    new_plan_id,
    plan_document,
)
from controlplane.plans._repository import (
    PLAN_CHANNEL,
    Decision,
    PlanChange,
    PlanConflict,
    PlanFilter,
    PlanRepository,
    RequestIdConflict,
)
from controlplane.plans._validate import PlanInvalid, PlanLimitsConfig, validate_plan
from controlplane.policy import Effect, EvaluationContext, PolicyEngine, RuleSet, Verdict
from controlplane.policy import Violation as PolicyViolation
from controlplane.store import Bus, Store
from processkit import wait_event

log = logging.getLogger(__name__)

_TRACER = trace.get_tracer(__name__)
# Always W3C trace context: what is stored with a plan must read back the same whatever the
# OTEL_PROPAGATORS of the replica that executes it.
_TRACE_CONTEXT = TraceContextTextMapPropagator()

DRY_RUNS_IN_PARALLEL = 8
DRY_RUN_TIMEOUT_S = 15.0


class PlanStateError(Exception):
    """The plan's phase does not allow the request (approving a running plan, say)."""


class RequestIdReused(Exception):
    """The request_id names an earlier plan with a different body."""


class SelfApproval(Exception):
    """A principal may not approve a plan it submitted."""


@dataclass(frozen=True, slots=True)
class PlannedCommand:
    """One run that executing a plan would start: which step, on which target, in which wave,
    and what its executor says it will do."""

    step_index: int
    step_id: str
    action: str
    node_id: str
    """The node, or for a target that is not a node its key."""
    wave: int
    summary: str = ""
    changes: tuple[FieldChange, ...] = ()
    """What a dry run says the run would change (validate_only submissions only)."""
    dry_run_error: str = ""


@dataclass(frozen=True, slots=True)
class Submission:
    """The outcome of a submission: the plan as stored (or as it would be) and its preview."""

    plan: Plan
    preview: tuple[PlannedCommand, ...]
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class FleetView:
    """What the plans side needs to know about the fleet (the registry provides it)."""

    fleet_size: Callable[[], int]
    connected_nodes: Callable[[], int]
    cordoned_nodes: Callable[[], frozenset[str]]


def preview_of(plan: Plan, executors: Executors) -> tuple[PlannedCommand, ...]:
    """The runs executing `plan` starts, in order, grouped in waves per step."""
    size = max(plan.limits.max_nodes_in_parallel, 1)
    return tuple(
        PlannedCommand(
            step.index,
            step.step_id,
            step.action,
            target.result_key,
            i // size,
            executors.for_target(target).preview(step.action, step.parameters, target),
        )
        for step in plan.steps
        for i, target in enumerate(step.targets)
    )


def digest_of(plan: Plan) -> str:
    """A stable digest of what was asked, to tell a replay from a reuse of the request_id."""
    document = plan_document(plan)
    document.pop("plan_id")
    document.pop("submitted_by")
    raw = json.dumps(document, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()


class PlanDesk:
    """Takes plans in (validation, policy, storage), answers reads and watches, and records
    approvals and cancellations; it never executes anything."""

    def __init__(
        self,
        store: Store,
        policy: PolicyEngine,
        fleet: FleetView,
        executors: Executors,
        *,
        limits: PlanLimitsConfig,
        rate_window_s: float,
        check_expression: Callable[[str], str | None] = gate_expression_problem,
        poll_interval_s: float = 1.0,
        on_change: Callable[[PlanChange], None] | None = None,
        bus: Bus | None = None,
        on_remote_change: Callable[[str], None] | None = None,
        autonomy: AutonomyGuard | None = None,
        guard: StateGuard | None = None,
    ) -> None:
        self._autonomy = autonomy
        self._guard = guard
        replicated = bus is not None and bus.enabled
        self.repository = PlanRepository(store, self._changed, bus if replicated else None)
        self._on_remote_change = on_remote_change
        if bus is not None and replicated:
            bus.subscribe(PLAN_CHANNEL, lambda _sender, plan_id: self._changed_elsewhere(plan_id))
            bus.on_connected(self._wake_all_watchers)
        self._policy = policy
        self._fleet = fleet
        self._executors = executors
        self._limits = limits
        self._rate_window = dt.timedelta(seconds=rate_window_s)
        self._check_expression = check_expression
        self._poll_interval_s = poll_interval_s
        self._on_change = on_change
        self._watchers: dict[str, set[asyncio.Event]] = {}

    # --- submission -------------------------------------------------------------------------

    async def submit(self, draft: Plan, principal: str, *, validate_only: bool) -> Submission:
        """Validates, records its targets' state and checks its preconditions, checks policy
        and (unless `validate_only`) stores the plan, already in its verdict's phase. Raises
        PlanInvalid, PreconditionFailed, RequestIdReused.

        Traced as `plan.submit` (a child of the calling RPC's span), whose context is stored
        with the plan: its execution continues the same trace."""
        with _TRACER.start_as_current_span(
            "plan.submit",
            attributes={
                "sentinel.plan.request_id": draft.request_id,
                "sentinel.plan.source": draft.source,
                "sentinel.plan.steps": len(draft.steps),
                "sentinel.plan.validate_only": validate_only,
            },
        ) as span:
            submission = await self._submit(draft, principal, validate_only=validate_only)
            if span.is_recording():
                span.set_attributes(
                    {
                        "sentinel.plan.id": submission.plan.plan_id,
                        "sentinel.plan.phase": submission.plan.phase.value,
                        "sentinel.plan.replayed": submission.replayed,
                    }
                )
            return submission

    async def _submit(self, draft: Plan, principal: str, *, validate_only: bool) -> Submission:
        now = dt.datetime.now(dt.UTC)
        with _TRACER.start_as_current_span("plan.validate") as span:
            problems = validate_plan(
                draft,
                now=now,
                limits=self._limits,
                executors=self._executors,
                check_expression=self._check_expression,
            )
            span.set_attribute("sentinel.plan.problems", len(problems))
        if problems:
            raise PlanInvalid(problems)
        plan = draft.copy()
        plan.submitted_by = principal
        plan.plan_id = new_plan_id()
        plan.created_at = now
        plan.trace_context = {}
        _TRACE_CONTEXT.inject(plan.trace_context)  # nothing when the submission is not traced
        digest = digest_of(plan)
        if self._guard is not None:
            try:
                with _TRACER.start_as_current_span("plan.record_state"):
                    await self._guard.record(plan)
            except PreconditionFailed:
                # A retry of a submission that was stored: the plan may since have changed
                # its own targets; it is replayed, not judged again.
                existing = await self.repository.find_by_request_id(plan.request_id)
                if plan.request_id and existing is not None:
                    return self._replay(existing, digest)
                raise
        submitting = otel_context.get_current()
        # The rules in force now judge the plan, and say whether its history must be read.
        rules = self._policy.rules_in_force()

        def decide(recent: dict[str, int]) -> Decision:
            # Runs on the store thread, inside the submission's transaction: the verdict and
            # the insert see the same history, in one round of the database. The span's
            # parent is passed in: the thread does not carry the caller's context.
            with _TRACER.start_as_current_span("plan.policy", context=submitting) as span:
                verdict = self._evaluate(plan, now, recent, rules)
                span.set_attribute("sentinel.plan.verdict", verdict.outcome)
            plan.violations = tuple(
                Violation(v.rule_id, v.message, v.field, v.effect.value)
                for v in (*verdict.rejections, *verdict.approvals_required)
            )
            outcome = Phase(verdict.outcome)
            plan.phase = outcome
            transitions = (
                Transition(Phase.PENDING, Phase.VALIDATING, now, principal, "submitted"),
                Transition(
                    Phase.VALIDATING, outcome, now, "policy-engine", _verdict_reason(verdict)
                ),
            )
            return Decision(plan, digest, transitions, store=not validate_only)

        try:
            with _TRACER.start_as_current_span(
                "plan.store", attributes={"sentinel.plan.id": plan.plan_id}
            ):
                outcome = await self.repository.submit_new(
                    plan, now - self._rate_window, decide, history=rules.reads("history")
                )
        except RequestIdConflict as conflict:
            return self._replay(await self.repository.get(conflict.plan_id), digest)
        if isinstance(outcome, Plan):
            return self._replay(outcome, digest)
        stored = outcome.plan
        preview = preview_of(stored, self._executors) if stored.phase != Phase.REJECTED else ()
        if validate_only:
            stored.plan_id = ""
            stored.transitions = outcome.transitions
            return Submission(stored, await self._dry_runs(stored, preview, now))
        log.info(
            "plan %s from %s: %s",
            stored.plan_id,
            stored.source,
            stored.phase,
            extra={"plan_id": stored.plan_id, "request_id": stored.request_id},
        )
        return Submission(stored, preview)

    async def _dry_runs(
        self, plan: Plan, preview: tuple[PlannedCommand, ...], now: dt.datetime
    ) -> tuple[PlannedCommand, ...]:
        """The preview with what each run would change, asked of its executor (a server-side
        dry run on Kubernetes), a few at a time and each bounded in time."""
        gate = asyncio.Semaphore(DRY_RUNS_IN_PARALLEL)
        runs = [(step, target) for step in plan.steps for target in step.targets]

        async def one(command: PlannedCommand, step: Step, target: Target) -> PlannedCommand:
            run = StepRun(
                plan_id="dry-run",
                step_index=step.index,
                action=step.action,
                parameters=step.parameters,
                target=target,
                deadline=now + dt.timedelta(seconds=min(step.timeout_s, DRY_RUN_TIMEOUT_S)),
            )
            async with gate:
                result = await self._executors.for_target(target).dry_run(run)
            return dataclasses.replace(command, changes=result.changes, dry_run_error=result.error)

        return tuple(
            await asyncio.gather(
                *(one(c, step, target) for c, (step, target) in zip(preview, runs, strict=True))
            )
        )

    def _replay(self, existing: Plan, digest: str) -> Submission:
        if digest_of(existing) != digest:
            raise RequestIdReused(
                f"request_id {existing.request_id!r} was already used for plan "
                f"{existing.plan_id} with a different plan; use a new request_id for a new plan"
            )
        return Submission(existing, preview_of(existing, self._executors), replayed=True)

    def _evaluate(
        self, plan: Plan, now: dt.datetime, recent: dict[str, int], rules: RuleSet
    ) -> Verdict:
        autonomy = self._autonomy
        context = EvaluationContext(
            now=now,
            fleet_size=self._fleet.fleet_size(),
            connected_nodes=self._fleet.connected_nodes(),
            cordoned_nodes=self._fleet.cordoned_nodes(),
            recent_plans_by_target=recent,
            rate_window_s=self._rate_window.total_seconds(),
            source=autonomy.source_variables(plan.source) if autonomy else {},
            breaker=autonomy.breaker_variables() if autonomy else {},
        )
        verdict = self._policy.evaluate(plan_document(plan), context, rules)
        # The breaker's hold is built in, after the policies: no policy edit removes it. A
        # plan judged again (its batch failed and it is written alone) is judged afresh.
        plan.waiting_reason = ""
        if autonomy is not None and (held := autonomy.admission_hold(plan)) is not None:
            plan.waiting_reason = held
            hold = PolicyViolation(BREAKER_RULE_ID, held, "", Effect.REQUIRE_APPROVAL, "builtin")
            verdict = Verdict(verdict.rejections, (*verdict.approvals_required, hold))
        return verdict

    # --- reads ------------------------------------------------------------------------------

    async def get(self, plan_id: str) -> Plan:
        return await self.repository.get(plan_id)

    async def list(self, where: PlanFilter, after_id: str, limit: int) -> list[Plan]:
        return await self.repository.query(where, after_id, limit)

    async def watch(self, plan_id: str) -> AsyncIterator[tuple[Plan, Transition | None]]:
        """The current plan first, then one item per transition (in order) or step update,
        until the plan is terminal. Woken by changes made here and, through the bus, by other
        replicas; the poll is the safety net under both."""
        event = asyncio.Event()
        self._watchers.setdefault(plan_id, set()).add(event)
        try:
            plan = await self.repository.get(plan_id)
            seen_transitions = len(plan.transitions)
            version = plan.version
            yield plan, None
            while not plan.phase.terminal:
                with contextlib.suppress(TimeoutError):
                    await wait_event(event, self._poll_interval_s)
                event.clear()
                plan = await self.repository.get(plan_id)
                if plan.version == version:
                    continue
                version = plan.version
                new = plan.transitions[seen_transitions:]
                seen_transitions = len(plan.transitions)
                if not new:
                    yield plan, None
                for transition in new:
                    yield plan, transition
        finally:
            watchers = self._watchers.get(plan_id)
            if watchers is not None:
                watchers.discard(event)
                if not watchers:
                    del self._watchers[plan_id]

    def _changed_elsewhere(self, plan_id: str) -> None:
        """Another replica changed the plan: wake its watchers and the controller."""
        for event in self._watchers.get(plan_id, ()):
            event.set()
        if self._on_remote_change is not None:
            self._on_remote_change(plan_id)

    def _wake_all_watchers(self) -> None:
        for events in self._watchers.values():
            for event in events:
                event.set()

    def _changed(self, change: PlanChange) -> None:
        for event in self._watchers.get(change.plan.plan_id, ()):
            event.set()
        if self._on_change is not None:
            self._on_change(change)

    # --- operator actions -------------------------------------------------------------------

    async def approve(self, plan_id: str, principal: str, reason: str) -> Plan:
        for _ in range(5):
            plan = await self.repository.get(plan_id)
            if plan.phase == Phase.PAUSED:
                try:
                    return await self._resume(plan, principal, reason)
                except PlanConflict:
                    continue
            if plan.phase != Phase.AWAITING_APPROVAL:
                raise PlanStateError(
                    f"plan {plan_id} is {plan.phase}; only a plan AWAITING_APPROVAL (or PAUSED) "
                    "can be approved"
                )
            if plan.submitted_by == principal:
                raise SelfApproval(
                    f"{principal} submitted plan {plan_id} and may not approve it; "
                    "another operator must"
                )
            if self._guard is not None:
                # Judged on the state at approval, which the steps are then checked against:
                # raises PreconditionFailed, leaving the plan awaiting approval.
                await self._guard.record(plan)
            why = f"approved by {principal}" + (f": {reason}" if reason else "")
            plan.waiting_reason = ""  # whatever it waited for, an operator let it go
            try:
                return await self.repository.save(
                    plan, to_phase=Phase.APPROVED, actor=principal, reason=why
                )
            except PlanConflict:
                continue
        raise PlanConflict(f"plan {plan_id} kept changing; try again")

    async def _resume(self, plan: Plan, principal: str, reason: str) -> Plan:
        """An operator lets a paused plan go on (the controller sees it EXECUTING again)."""
        why = f"resumed by {principal}" + (f": {reason}" if reason else "")
        plan.paused_until = None
        plan.status_message = why
        return await self.repository.save(
            plan, to_phase=Phase.EXECUTING, actor=principal, reason=why
        )

    async def cancel(self, plan_id: str, principal: str, reason: str) -> Plan:
        """Cancels a plan that has not started; a running plan is stopped and rolled back by
        the controller (the returned plan says the cancel was requested)."""
        why = f"cancelled by {principal}" + (f": {reason}" if reason else "")
        for _ in range(5):
            plan = await self.repository.get(plan_id)
            try:
                if plan.phase in (Phase.AWAITING_APPROVAL, Phase.APPROVED):
                    plan.status_message = why
                    return await self.repository.save(
                        plan, to_phase=Phase.CANCELLED, actor=principal, reason=why
                    )
                if plan.phase in (Phase.EXECUTING, Phase.PAUSED):
                    if not plan.cancel_requested:
                        plan.cancel_requested = why
                        plan.status_message = f"cancel requested ({why}); rolling back"
                        return await self.repository.save(plan)
                    return plan
            except PlanConflict:
                continue
            raise PlanStateError(f"plan {plan_id} is {plan.phase} and cannot be cancelled")
        raise PlanConflict(f"plan {plan_id} kept changing; try again")


def _verdict_reason(verdict: Verdict) -> str:
    if verdict.rejections:
        return "rejected by policy: " + ", ".join(v.rule_id for v in verdict.rejections)
    if verdict.approvals_required:
        return "approval required by policy: " + ", ".join(
            v.rule_id for v in verdict.approvals_required
        )
    return "all policies passed"
