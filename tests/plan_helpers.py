"""Building and following plans over the real API, as InfraMind and operators do."""

from __future__ import annotations

import asyncio
import datetime as dt
import pathlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from google.protobuf import struct_pb2
from sentinel.v1 import plan_pb2, plan_pb2_grpc

from tests.conftest import Pki

Phase = plan_pb2.PlanPhase
TERMINAL = {
    plan_pb2.PLAN_PHASE_REJECTED,
    plan_pb2.PLAN_PHASE_COMPLETED,
    plan_pb2.PLAN_PHASE_FAILED,
    plan_pb2.PLAN_PHASE_ROLLED_BACK,
    plan_pb2.PLAN_PHASE_CANCELLED,
}


@asynccontextmanager
async def plan_client(
    pki: Pki, port: int, role: str = "planner", name: str = "inframind"
) -> AsyncIterator[plan_pb2_grpc.PlanServiceStub]:
    async with grpc.aio.secure_channel(
        f"localhost:{port}", pki.channel_credentials(role, name)
    ) as channel:
        yield plan_pb2_grpc.PlanServiceStub(channel)


def step(
    action: str,
    nodes: list[str],
    parameters: dict[str, Any] | None = None,
    *,
    timeout_s: float = 10.0,
    step_id: str = "",
) -> plan_pb2.PlanStep:
    message = plan_pb2.PlanStep(step_id=step_id, action=action)
    for node in nodes:
        message.targets.add(node_id=node)
    struct = struct_pb2.Struct()
    struct.update(parameters or {})
    message.parameters.CopyFrom(struct)
    message.timeout.FromTimedelta(dt.timedelta(seconds=timeout_s))
    return message


def plan(
    *steps: plan_pb2.PlanStep,
    confidence: float = 0.95,
    parallel: int = 1,
    request_id: str = "",
    expire_in_s: float | None = None,
    gates: list[tuple[str, str, float]] = (),  # type: ignore[assignment]
) -> plan_pb2.Plan:
    message = plan_pb2.Plan(
        request_id=request_id,
        source="inframind",
        rationale="test",
        confidence=confidence,
        steps=list(steps),
        limits=plan_pb2.PlanLimits(max_nodes_in_parallel=parallel),
    )
    if expire_in_s is not None:
        message.expire_time.FromDatetime(
            dt.datetime.now(dt.UTC) + dt.timedelta(seconds=expire_in_s)
        )
    for name, expression, window_s in gates:
        gate = message.health_gates.add(name=name, expression=expression)
        gate.window.FromTimedelta(dt.timedelta(seconds=window_s))
    return message


async def wait_terminal(
    stub: plan_pb2_grpc.PlanServiceStub, plan_id: str, timeout: float = 30.0
) -> plan_pb2.Plan:
    async def follow() -> plan_pb2.Plan:
        while True:
            got = (await stub.GetPlan(plan_pb2.GetPlanRequest(plan_id=plan_id))).plan
            if got.phase in TERMINAL:
                return got
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(follow(), timeout)


async def wait_phase(
    stub: plan_pb2_grpc.PlanServiceStub, plan_id: str, phase: int, timeout: float = 30.0
) -> plan_pb2.Plan:
    async def follow() -> plan_pb2.Plan:
        while True:
            got = (await stub.GetPlan(plan_pb2.GetPlanRequest(plan_id=plan_id))).plan
            if got.phase == phase:
                return got
            assert got.phase not in TERMINAL, f"ended {Phase.Name(got.phase)}: {got}"
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(follow(), timeout)


def phases(message: plan_pb2.Plan) -> list[str]:
    """The phases a plan went through, from its transitions."""
    names = [Phase.Name(t.from_phase) for t in message.transitions[:1]]
    names += [Phase.Name(t.to_phase) for t in message.transitions]
    return [n.removeprefix("PLAN_PHASE_") for n in names]


APPROVAL_POLICY = """
policy_id: approvals
description: low-confidence plans need an operator
rules:
  - rule_id: confidence-floor
    expression: plan.confidence >= 0.8
    message: confidence below 0.8 needs an operator's approval
    field: confidence
    effect: REQUIRE_APPROVAL
"""
"""Sends every plan of confidence below 0.8 to approval (pass `confidence=0.5` to `plan`):
it is stored AWAITING_APPROVAL and nothing runs until an operator approves it."""


def write_policy(path: pathlib.Path, text: str) -> str:
    path.write_text(text)
    return str(path)
