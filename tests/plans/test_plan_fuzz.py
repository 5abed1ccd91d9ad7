"""Fuzzing SubmitPlan with malformed plans (hypothesis): the answer is always a clean
INVALID_ARGUMENT naming a field (or a verdict for a plan that happens to be well-formed), never
INTERNAL or UNKNOWN, and a refused plan leaves nothing stored.

The control plane and one agent run on an event loop in a background thread, so hypothesis can
drive the real gRPC API synchronously, example after example, against one server.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import pathlib
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sentinel.v1 import plan_pb2, plan_pb2_grpc
from sqlalchemy import create_engine, text

from controlplane import ControlPlane
from nodeagent.agent import NodeAgent
from nodeagent.collectors import AsyncGpuCollector, HostCollector
from nodeagent.settings import AgentSettings
from tests.conftest import Pki, fast_settings

REJECT_ALL = """
policy_id: fuzz-reject-all
description: well-formed fuzz plans are judged, stored as REJECTED, and never executed
rules:
  - rule_id: never
    expression: plan.confidence > 2.0
    message: fuzzing only
"""


class _Server:
    def __init__(self, pki: Pki, database_url: str, state_dir: pathlib.Path) -> None:
        self.pki = pki
        self.database_url = database_url
        self.state_dir = state_dir
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="fuzz-server", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by the fixture
            self.error = exc
            self.ready.set()

    async def _serve(self) -> None:
        policy = self.state_dir / "reject-all.yaml"
        policy.write_text(REJECT_ALL)
        cp = ControlPlane(fast_settings(self.pki, self.database_url, policy_paths=str(policy)))
        await cp.start()
        cert, key = self.pki.client("agent", "node-a")
        agent = NodeAgent(
            AgentSettings(
                node_id="node-a",
                ca=self.pki.ca_path,
                cert=cert,
                key=key,
                control_plane=f"localhost:{cp.port}",
                state_dir=self.state_dir / "agent",
                metrics_listen="",
            ),
            host_collector=HostCollector(),
            gpu_collector=AsyncGpuCollector(),
        )
        agent_task = asyncio.create_task(agent.run())
        await asyncio.wait_for(agent.connected.wait(), 10)
        self.port = cp.port
        self._stop = asyncio.Event()
        self.ready.set()
        await self._stop.wait()
        agent.stop()
        await asyncio.wait_for(agent_task, 10)
        await cp.stop()

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)


@pytest.fixture
def server(pki: Pki, database_url: str, tmp_path: pathlib.Path) -> Iterator[_Server]:
    running = _Server(pki, database_url, tmp_path)
    running.thread.start()
    assert running.ready.wait(30), "fuzz server did not start"
    if running.error is not None:
        raise running.error
    yield running
    running.stop()


def _plan_count(database_url: str) -> int:
    engine = create_engine(database_url)
    try:
        with engine.connect() as db:
            return int(db.execute(text("SELECT count(*) FROM plans")).scalar_one())
    finally:
        engine.dispose()


_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**60), max_value=2**60),
    st.text(max_size=20),
)
_json = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
_parameters = st.dictionaries(
    st.sampled_from(["watts", "gpus", "per_gpu_watts", "seconds", "include", "x", ""]),
    _json,
    max_size=3,
)
_actions = st.one_of(
    st.sampled_from(
        [
            "set_gpu_power_limit",
            "set_telemetry_interval",
            "run_diagnostic",
            "cordon",
            "uncordon",
            "scale",
            "rollout",
            "",
        ]
    ),
    st.text(max_size=30),
)
_node_ids = st.one_of(st.just("node-a"), st.text(max_size=140))
_int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@st.composite
def _targets(draw: Any) -> plan_pb2.Target:
    kind = draw(st.sampled_from(["node", "kubernetes", "empty"]))
    if kind == "node":
        return plan_pb2.Target(node_id=draw(_node_ids))
    if kind == "kubernetes":
        return plan_pb2.Target(
            kubernetes=plan_pb2.KubernetesObject(
                cluster=draw(st.text(max_size=10)), name=draw(st.text(max_size=10))
            )
        )
    return plan_pb2.Target()


@st.composite
def _steps(draw: Any) -> plan_pb2.PlanStep:
    step = plan_pb2.PlanStep(
        step_id=draw(st.one_of(st.just(""), st.text(max_size=140))),
        action=draw(_actions),
        targets=draw(st.lists(_targets(), max_size=4)),
    )
    parameters = draw(_parameters)
    # A value Struct cannot hold at all leaves the step without parameters.
    with contextlib.suppress(ValueError, TypeError):
        step.parameters.update(parameters)
    if draw(st.booleans()):
        step.timeout.seconds = draw(st.integers(min_value=-(10**12), max_value=10**12))
        step.timeout.nanos = draw(st.integers(min_value=-999_999_999, max_value=999_999_999))
    # Output-only fields a client might fill in anyway: they must be ignored.
    step.state = draw(st.sampled_from(list(plan_pb2.StepState.values())))
    return step


@st.composite
def malformed_plans(draw: Any) -> plan_pb2.SubmitPlanRequest:
    plan = plan_pb2.Plan(
        source=draw(st.one_of(st.just("inframind"), st.text(max_size=200))),
        rationale=draw(st.text(max_size=50)),
        confidence=draw(st.floats(allow_nan=True, allow_infinity=True)),
        steps=draw(st.lists(_steps(), max_size=4)),
        request_id=draw(st.text(max_size=200)),
        phase=draw(st.sampled_from(list(plan_pb2.PlanPhase.values()))),
        plan_id=draw(st.text(max_size=10)),
    )
    if draw(st.booleans()):
        plan.expire_time.seconds = draw(_int64)
        plan.expire_time.nanos = draw(st.integers(min_value=-(2**31), max_value=2**31 - 1))
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        gate = plan.health_gates.add(
            name=draw(st.text(max_size=20)), expression=draw(st.text(max_size=40))
        )
        if draw(st.booleans()):
            gate.window.seconds = draw(st.integers(min_value=-(10**6), max_value=10**6))
    plan.limits.max_nodes_in_parallel = draw(st.integers(min_value=0, max_value=2**32 - 1))
    if draw(st.booleans()):
        plan.limits.deadline.seconds = draw(_int64)
    return plan_pb2.SubmitPlanRequest(
        plan=plan,
        request_id=draw(st.one_of(st.just(""), st.text(max_size=200))),
        validate_only=draw(st.booleans()),
    )


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=malformed_plans())
def test_submit_plan_never_fails_internally_and_stores_nothing_it_refuses(
    server: _Server, request: plan_pb2.SubmitPlanRequest
) -> None:
    before = _plan_count(server.database_url)
    with grpc.secure_channel(
        f"localhost:{server.port}", server.pki.channel_credentials("planner", "fuzzer")
    ) as channel:
        stub = plan_pb2_grpc.PlanServiceStub(channel)
        try:
            response = stub.SubmitPlan(request, timeout=10)
        except grpc.RpcError as exc:
            code = exc.code()
            details = exc.details() or ""
            assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS), (
                f"{code}: {details}"
            )
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert "plan" in details or "request_id" in details, details
            assert _plan_count(server.database_url) == before
            return
    # A plan that happened to be well-formed gets a verdict (the reject-all policy).
    assert response.plan.phase == plan_pb2.PLAN_PHASE_REJECTED
    stored = _plan_count(server.database_url)
    expected = before if request.validate_only or response.replayed else before + 1
    assert stored == expected
    assert not math.isnan(response.plan.confidence)
