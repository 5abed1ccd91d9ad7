"""The plan desk and the pipeline controller on a real store (SQLite or PostgreSQL) with the
executors a test gives, and no gRPC server: for tests of plans and executors that are clearer
below the transport."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from controlplane.executors import Executors, Target
from controlplane.plans import (
    FleetView,
    HealthGates,
    Lease,
    Limits,
    PipelineController,
    Plan,
    PlanDesk,
    PlanLimitsConfig,
    Step,
)
from controlplane.policy import PolicyEngine
from controlplane.store import Store
from controlplane.telemetry import Sample


def draft_plan(
    *steps: tuple[str, list[Target], dict[str, Any]], timeout_s: float = 30.0, parallel: int = 1
) -> Plan:
    """A plan of (action, targets, parameters) steps, as a planner would submit it."""
    return Plan(
        plan_id="",
        request_id=uuid.uuid4().hex,
        source="test",
        rationale="",
        confidence=0.9,
        expire_at=None,
        steps=[
            Step(i, f"s{i}", action, tuple(targets), parameters, timeout_s)
            for i, (action, targets, parameters) in enumerate(steps)
        ],
        health_gates=(),
        limits=Limits(max_nodes_in_parallel=parallel),
    )


@dataclass
class PlanRig:
    """A running desk and controller."""

    desk: PlanDesk
    controller: PipelineController

    async def run(self, draft: Plan) -> Plan:
        """Submits `draft` and returns it as it ended."""
        submitted = await self.desk.submit(draft, "planner", validate_only=False)
        return await self.terminal(submitted.plan.plan_id)

    async def terminal(self, plan_id: str, timeout_s: float = 60.0) -> Plan:
        async def follow() -> Plan:
            async for current, _ in self.desk.watch(plan_id):
                if current.phase.terminal:
                    return current
            raise AssertionError("watch ended before the plan did")

        return await asyncio.wait_for(follow(), timeout_s)


def _no_telemetry(node_id: str) -> Sample[dict[str, Any]] | None:
    return None


@contextlib.asynccontextmanager
async def plan_rig(database_url: str, executors: Executors) -> AsyncIterator[PlanRig]:
    """A desk and a controller (holding the lease, reconciling every 50 ms) on a fresh store;
    no policies, no fleet, no telemetry."""
    store = Store(database_url)
    store.migrate()
    desk = PlanDesk(
        store,
        PolicyEngine(),
        FleetView(fleet_size=lambda: 0, connected_nodes=lambda: 0, cordoned_nodes=frozenset),
        executors,
        limits=PlanLimitsConfig(max_steps=10, max_targets=10),
        rate_window_s=60,
        poll_interval_s=0.05,
    )
    controller = PipelineController(
        desk.repository,
        Lease(store, "pipeline-controller", "test", 10),
        executors,
        HealthGates(_no_telemetry, dict),
        interval_s=0.05,
    )
    task = asyncio.create_task(controller.run())
    try:
        yield PlanRig(desk, controller)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        store.close()
