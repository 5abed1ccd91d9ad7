"""`AutonomyService`: the autonomy breaker (status, reset) and each plan source's calibration;
the disruption budgets are filled in by a callable the budgets provide."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Sequence

import grpc
from sentinel.v1 import autonomy_pb2, autonomy_pb2_grpc

from controlplane.api._convert import timestamp
from controlplane.api._errors import abort
from controlplane.auth import current_principal
from controlplane.autonomy import Autonomy, BreakerState, BreakerThresholds, Calibration
from controlplane.plans import DisruptionBudgets
from controlplane.store import has_nul

MAX_REASON = 2000

BudgetMessages = Callable[[], Awaitable[Sequence[autonomy_pb2.DisruptionBudget]]]
"""The disruption budgets as GetAutonomyStatus shows them (the budgets' hook)."""


def _duration(seconds: float) -> dt.timedelta:
    return dt.timedelta(seconds=seconds)


def breaker_message(
    state: BreakerState, thresholds: BreakerThresholds
) -> autonomy_pb2.AutonomyBreaker:
    message = autonomy_pb2.AutonomyBreaker(
        tripped=state.tripped,
        reason=state.reason,
        reset_by=state.reset_by,
        reset_reason=state.reset_reason,
        thresholds=autonomy_pb2.BreakerThresholds(
            max_rollbacks=thresholds.max_rollbacks,
            max_unhealthy_fraction=thresholds.max_unhealthy_fraction,
        ),
    )
    message.thresholds.window.FromTimedelta(_duration(thresholds.window_s))
    if state.trip_time is not None:
        message.trip_time.CopyFrom(timestamp(state.trip_time))
    if state.reset_time is not None:
        message.reset_time.CopyFrom(timestamp(state.reset_time))
    return message


def calibration_message(calibration: Calibration) -> autonomy_pb2.PlannerCalibration:
    message = autonomy_pb2.PlannerCalibration(
        source=calibration.source,
        plans=calibration.plans,
        rollbacks=calibration.rollbacks,
        predictions=calibration.predictions,
        predictions_held=calibration.predictions_held,
        hit_rate=calibration.hit_rate,
        mean_confidence=calibration.mean_confidence,
    )
    message.window.FromTimedelta(_duration(calibration.window_s))
    return message


class AutonomyService(autonomy_pb2_grpc.AutonomyServiceServicer):
    """Shows the autonomy guards and lets an operator reset the breaker."""

    def __init__(self, autonomy: Autonomy, budgets: BudgetMessages | None = None) -> None:
        self._autonomy = autonomy
        # Hook for the disruption budgets (docs/safe-autonomy.md): None shows none.
        self._budgets = budgets

    async def GetAutonomyStatus(
        self, request: autonomy_pb2.GetAutonomyStatusRequest, context: grpc.aio.ServicerContext
    ) -> autonomy_pb2.GetAutonomyStatusResponse:
        status = self._autonomy.status()
        budgets = list(await self._budgets()) if self._budgets is not None else []
        return autonomy_pb2.GetAutonomyStatusResponse(
            breaker=breaker_message(status.breaker, status.thresholds),
            budgets=budgets,
            calibration=[calibration_message(c) for c in status.calibration],
        )

    async def ResetBreaker(
        self, request: autonomy_pb2.ResetBreakerRequest, context: grpc.aio.ServicerContext
    ) -> autonomy_pb2.ResetBreakerResponse:
        reason = request.reason.strip()
        if not reason:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "reason: required")
        if has_nul(reason) or len(reason) > MAX_REASON:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"reason: at most {MAX_REASON} characters, without NUL",
            )
        # Database errors are answered UNAVAILABLE by the interceptor.
        state = await self._autonomy.reset(current_principal().spiffe_id, reason)
        return autonomy_pb2.ResetBreakerResponse(
            breaker=breaker_message(state, self._autonomy.thresholds)
        )

    async def GetPlannerCalibration(
        self, request: autonomy_pb2.GetPlannerCalibrationRequest, context: grpc.aio.ServicerContext
    ) -> autonomy_pb2.GetPlannerCalibrationResponse:
        if not request.source:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "source: required")
        return autonomy_pb2.GetPlannerCalibrationResponse(
            calibration=calibration_message(self._autonomy.calibration.of(request.source))
        )


def budget_messages(budgets: DisruptionBudgets) -> BudgetMessages:
    """The disruption budgets' hook: each budget with its covered nodes, limit and holds."""

    async def read() -> list[autonomy_pb2.DisruptionBudget]:
        messages = []
        for state in await budgets.state():
            message = autonomy_pb2.DisruptionBudget(
                name=state.budget.name,
                node_patterns=state.budget.node_patterns,
                kubernetes_cluster=state.budget.kubernetes_cluster,
                max_nodes=state.budget.max_nodes,
                max_percent=state.budget.max_percent,
                nodes_covered=state.nodes_covered,
                limit=state.limit,
            )
            for hold in state.holds:
                held = message.holds.add(node=hold.node, plan_id=hold.plan_id)
                if hold.acquired_at is not None:
                    held.acquire_time.CopyFrom(timestamp(hold.acquired_at))
            messages.append(message)
        return messages

    return read
