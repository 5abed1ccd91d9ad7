"""The autonomy guards as one object: planner calibration and the autonomy breaker, judged by a
background loop on every replica and answered from memory to the plan desk (policy variables,
the built-in hold of new planner plans) and the controller (the pause before a wave)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from controlplane.autonomy._breaker import BreakerState, BreakerStore
from controlplane.autonomy._calibration import (
    Calibration,
    CalibrationCache,
    PlanOutcome,
    is_planner_plan,
)
from controlplane.autonomy._config import BreakerThresholds
from controlplane.fleet import AgentStatus, Liveness
from controlplane.plans import (
    IllegalTransition,
    Phase,
    Plan,
    PlanConflict,
    PlanFilter,
    PlanRepository,
)
from controlplane.store import Store
from processkit import wait_event

log = logging.getLogger(__name__)

ACTOR = "autonomy-breaker"
"""The actor of the breaker's trips and of the plans it sends back for approval."""
HOLD_PREFIX = "autonomy breaker tripped: "
# Transitions by these are not an operator's say-so: they do not exempt a plan from the hold.
_SYSTEM_ACTORS = frozenset({"policy-engine", "pipeline-controller", ACTOR})
_REQUEUE_BATCH = 500


@dataclass(frozen=True, slots=True)
class AutonomyStatus:
    """What GetAutonomyStatus shows of the breaker and calibration."""

    breaker: BreakerState
    thresholds: BreakerThresholds
    calibration: list[Calibration]


@dataclass(slots=True)
class _XidWatch:
    """New XIDs per node: the last value seen, and when it last changed (None: never seen to
    change; the first value seen is a baseline, not news)."""

    seen: dict[str, tuple[int, ...]] = field(default_factory=dict)
    changed_at: dict[str, dt.datetime] = field(default_factory=dict)


def operator_cleared(plan: Plan, since: dt.datetime | None) -> bool:
    """Whether an operator approved or resumed `plan` at or after `since` (the trip): such a
    plan was let go with the breaker open and is not held again."""
    if since is None:
        return False
    return any(
        t.at >= since
        and t.actor not in _SYSTEM_ACTORS
        and t.to_phase in (Phase.APPROVED, Phase.EXECUTING)
        for t in plan.transitions
    )


class Autonomy:
    """Planner calibration and the autonomy breaker (implements `plans.AutonomyGuard`)."""

    def __init__(
        self,
        store: Store,
        repository: Callable[[], PlanRepository],
        *,
        thresholds: BreakerThresholds,
        calibration_window_s: float,
        replica_id: str,
        fleet_size: Callable[[], int] = lambda: 0,
        unhealthy: Callable[[], Iterable[Liveness]] = list,
        on_breaker_changed: Callable[[BreakerState, str, str], None] | None = None,
        on_evaluated: Callable[[AutonomyStatus], None] | None = None,
        interval_s: float = 2.0,
    ) -> None:
        self.thresholds = thresholds
        self.calibration = CalibrationCache(
            store, window_s=calibration_window_s, keep_s=thresholds.window_s
        )
        self._breakers = BreakerStore(store)
        self._repository = repository
        self._replica_id = replica_id
        self._fleet_size = fleet_size
        self._unhealthy_nodes = unhealthy
        self._on_breaker_changed = on_breaker_changed
        self._on_evaluated = on_evaluated
        self._interval_s = interval_s
        self._wake = asyncio.Event()
        self._xid_watch = _XidWatch()
        # Nodes count as unhealthy only once seen after this start: after a restart of the
        # control plane every agent looks silent until it reconnects, which is not news about
        # the fleet (and tripping then would hold every plan after every restart).
        self._started_at = _utcnow()
        self.state = BreakerState()

    # --- AutonomyGuard (memory only: the submission's hot path) -----------------------------

    @property
    def pause_timeout_s(self) -> float:
        return self.thresholds.pause_timeout_s

    def source_variables(self, source: str) -> Mapping[str, Any]:
        return self.calibration.of(source).variables()

    def breaker_variables(self) -> Mapping[str, Any]:
        return {"tripped": self.state.tripped, "reason": self.state.reason}

    def admission_hold(self, plan: Plan) -> str | None:
        if self.state.tripped and is_planner_plan(plan):
            return HOLD_PREFIX + self.state.reason
        return None

    def wave_hold(self, plan: Plan) -> str | None:
        if not is_planner_plan(plan):
            return None
        if plan.phase == Phase.PAUSED and plan.waiting_reason.startswith(HOLD_PREFIX):
            return plan.waiting_reason  # paused by the breaker before a restart: still waiting
        state = self.state
        if state.tripped and not operator_cleared(plan, state.trip_time):
            return HOLD_PREFIX + state.reason
        return None

    # --- status and reset -------------------------------------------------------------------

    def status(self) -> AutonomyStatus:
        return AutonomyStatus(self.state, self.thresholds, self.calibration.all())

    async def reset(self, principal: str, reason: str) -> BreakerState:
        """Closes the breaker (an operator's call; recorded with who, when and why). Evidence
        from before the reset no longer counts towards the next trip."""
        state, was_tripped = await self._breakers.reset(principal, reason, _utcnow())
        self.state = state
        log.warning("autonomy breaker reset by %s: %s", principal, reason)
        if self._on_breaker_changed is not None:
            self._on_breaker_changed(state, principal, reason)
        if not was_tripped:
            log.info("the autonomy breaker was not tripped; the reset restarts its count")
        self._publish()
        return state

    # --- the loop ---------------------------------------------------------------------------

    def note(self, plan: Plan) -> None:
        """A plan changed on this replica (the desk's on_change): a terminal one counts now."""
        if plan.phase.terminal:
            outcome = self.calibration.note(plan)
            # Only what can trip the breaker wakes its loop (a query per pass): a planner
            # plan that rolled back.
            if outcome is not None and outcome.planner and outcome.rolled_back:
                self._wake.set()

    async def run(self) -> None:
        """Judges the breaker every `interval_s` (and on local terminal transitions)."""
        while True:
            try:
                await self.evaluate()
            except Exception as exc:  # the store is down, say: judge again next time
                log.warning("autonomy breaker could not be judged: %s", exc)
            with contextlib.suppress(TimeoutError):
                await wait_event(self._wake, self._interval_s)
            self._wake.clear()

    async def evaluate(self, now: dt.datetime | None = None) -> None:
        """One pass: re-read the breaker and calibration, trip when a threshold is crossed
        (a conditional update: one trip however many replicas judge it), and while tripped
        send queued planner plans back for approval."""
        now = now or _utcnow()
        state = await self._breakers.read()
        self.state = state
        await self.calibration.refresh(now)
        if not state.tripped and (reason := self._trip_reason(state, now)) is not None:
            tripped = await self._breakers.trip(state, reason, self._replica_id, now)
            if tripped is not None:
                self.state = tripped
                log.warning("autonomy breaker tripped: %s", reason)
                if self._on_breaker_changed is not None:
                    self._on_breaker_changed(tripped, ACTOR, reason)
            else:
                self.state = await self._breakers.read()
        if self.state.tripped:
            await self._requeue()
        self._publish()

    def _publish(self) -> None:
        if self._on_evaluated is not None:
            self._on_evaluated(self.status())

    def _since(self, state: BreakerState, now: dt.datetime) -> dt.datetime:
        since = now - dt.timedelta(seconds=self.thresholds.window_s)
        if state.reset_time is not None and state.reset_time > since:
            return state.reset_time
        return since

    def _trip_reason(self, state: BreakerState, now: dt.datetime) -> str | None:
        limits = self.thresholds
        since = self._since(state, now)
        if limits.max_rollbacks:
            rollbacks = self.calibration.planner_rollbacks_since(since)
            if len(rollbacks) >= limits.max_rollbacks:
                return (
                    f"{len(rollbacks)} planner plans rolled back within {limits.window_s:g} s "
                    f"(limit {limits.max_rollbacks}): {_plan_ids(rollbacks)}"
                )
        if limits.max_unhealthy_fraction:
            fleet = self._fleet_size()
            unhealthy = self._unhealthy(since)
            if fleet and len(unhealthy) / fleet > limits.max_unhealthy_fraction:
                shown = "; ".join(f"{n} {why}" for n, why in sorted(unhealthy.items())[:5])
                more = f" and {len(unhealthy) - 5} more" if len(unhealthy) > 5 else ""
                return (
                    f"{len(unhealthy)} of {fleet} nodes unhealthy "
                    f"({len(unhealthy) / fleet:.0%}, limit "
                    f"{limits.max_unhealthy_fraction:.0%}): {shown}{more}"
                )
        return None

    def _unhealthy(self, since: dt.datetime) -> dict[str, str]:
        """Nodes that turned silent or disconnected within the window (`since`: its start, or
        the last reset, which acknowledged what was down then) after being seen by this
        control plane, and nodes with a new XID within the window."""
        seen_after = max(since, self._started_at).timestamp()
        found: dict[str, str] = {}
        for node in self._unhealthy_nodes():
            if (
                node.status in (AgentStatus.DISCONNECTED, AgentStatus.SUSPECT)
                and node.last_seen >= seen_after
            ):
                found[node.node_id] = node.status.value.lower()
        for node_id, at in self._xid_watch.changed_at.items():
            if at >= since and node_id not in found:
                found[node_id] = f"new XID {self._xid_watch.seen.get(node_id)}"
        return found

    @property
    def watches_xids(self) -> bool:
        """Whether new XIDs count towards the breaker (`observe_xids` is worth calling)."""
        return bool(self.thresholds.max_unhealthy_fraction)

    def observe_xids(self, node_id: str, xids: tuple[int, ...]) -> None:
        """The last XID of each GPU in a sample received here (per sample, on the hot path:
        keep it a dict lookup and a comparison). The first value seen is a baseline."""
        watch = self._xid_watch
        before = watch.seen.get(node_id)
        if before != xids:
            if before is not None and any(xids):
                watch.changed_at[node_id] = _utcnow()
            watch.seen[node_id] = xids

    async def _requeue(self) -> None:
        """Planner plans approved but not started go back to AWAITING_APPROVAL (unless an
        operator approved them after the trip)."""
        state = self.state
        repository = self._repository()
        approved = await repository.query(PlanFilter(phase=Phase.APPROVED), "", _REQUEUE_BATCH)
        for plan in approved:
            if not is_planner_plan(plan) or operator_cleared(plan, state.trip_time):
                continue
            why = HOLD_PREFIX + state.reason
            plan.waiting_reason = why
            plan.status_message = f"waiting for an operator: {why}"
            try:
                await repository.save(
                    plan, to_phase=Phase.AWAITING_APPROVAL, actor=ACTOR, reason=why
                )
            except (PlanConflict, IllegalTransition):
                continue  # it started (or changed) meanwhile: the controller pauses it instead
            log.info("plan %s sent back for approval: %s", plan.plan_id, why)


def _plan_ids(outcomes: list[PlanOutcome]) -> str:
    ids = [o.plan_id for o in sorted(outcomes, key=lambda o: o.ended_at)]
    return ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
