"""Several control-plane replicas on one PostgreSQL acting as one: the agent directory,
commands and results across replicas, watches and telemetry from any replica, leadership.

Real replicas (in this process, or as processes where one must be SIGKILLed), real agents over
real TLS on loopback; a TCP forwarder in the test stands in for the load balancer."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from sentinel.v1 import fleet_pb2, fleet_pb2_grpc, plan_pb2, telemetry_pb2, telemetry_pb2_grpc
from sqlalchemy import create_engine, text
from sqlalchemy.exc import ProgrammingError

from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually, needs_postgres
from tests.fleet.test_restart_delivery import assert_contiguous, stream_seqs
from tests.plan_helpers import phases, plan, plan_client, step, wait_terminal
from tests.replicas._rig import Forwarder, free_port, start_replica

pytestmark = needs_postgres


def _rows(database_url: str, sql: str, **params: object) -> list[tuple[object, ...]]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as db:
            return [tuple(r) for r in db.execute(text(sql), params)]
    finally:
        engine.dispose()


def _commands(database_url: str, plan_id: str) -> list[tuple[object, ...]]:
    return _rows(
        database_url,
        "SELECT node_id, action, state, outcome FROM commands WHERE plan_id = :p"
        " ORDER BY node_id, created_at",
        p=plan_id,
    )


def _lease_holder(database_url: str) -> str | None:
    try:
        rows = _rows(database_url, "SELECT holder FROM leases")
    except ProgrammingError:  # the process has not created its tables yet
        return None
    return str(rows[0][0]) if rows else None


@contextlib.asynccontextmanager
async def fleet_client(pki: Pki, port: int) -> AsyncIterator[fleet_pb2_grpc.FleetServiceStub]:
    async with grpc.aio.secure_channel(
        f"localhost:{port}", pki.channel_credentials("operator", "alice")
    ) as channel:
        yield fleet_pb2_grpc.FleetServiceStub(channel)


async def test_a_plan_led_by_one_replica_runs_on_agents_held_by_another(
    pki: Pki,
    database_url: str,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
) -> None:
    a = await control_plane_factory(controller_id="replica-a")
    await eventually(lambda: a.controller.leader)
    b = await control_plane_factory(controller_id="replica-b")
    await agent_factory("node-1", b.port)
    await agent_factory("node-2", b.port)

    # The directory: replica A knows B holds both nodes, and says so.
    async with fleet_client(pki, a.port) as fleet:
        await eventually(lambda: a.registry.holder_of("node-2") == "replica-b")
        got = (await fleet.GetAgent(fleet_pb2.GetAgentRequest(node_id="node-1"))).agent
        assert (got.replica_id, got.replica_address) == ("replica-b", b.settings.listen)
        assert got.status == fleet_pb2.AGENT_STATUS_CONNECTED and got.HasField("connected_time")
        listed = (await fleet.ListAgents(fleet_pb2.ListAgentsRequest())).agents
        assert [(x.node_id, x.replica_id) for x in listed] == [
            ("node-1", "replica-b"),
            ("node-2", "replica-b"),
        ]

    # Submitted to A (validation sees B's agents), driven by A, carried out through B.
    async with plan_client(pki, a.port) as planner:
        submitted = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(
                    step("run_diagnostic", ["node-1", "node-2"]),
                    step("set_telemetry_interval", ["node-1", "node-2"], {"seconds": 1}),
                    parallel=2,
                )
            )
        )
        assert submitted.plan.phase == plan_pb2.PLAN_PHASE_APPROVED
        done = await wait_terminal(planner, submitted.plan.plan_id)
    assert phases(done)[-2:] == ["EXECUTING", "COMPLETED"], done.status_message
    assert not b.controller.leader
    assert _commands(database_url, submitted.plan.plan_id) == [
        (node, action, "FINISHED", "SUCCEEDED")
        for node in ("node-1", "node-2")
        for action in ("run_diagnostic", "set_telemetry_interval")
    ]


async def test_watch_plan_on_one_replica_sees_the_others_transitions_in_order(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    a = await control_plane_factory(controller_id="replica-a")
    await eventually(lambda: a.controller.leader)
    b = await control_plane_factory(controller_id="replica-b")
    await agent_factory("node-1", a.port)
    async with plan_client(pki, a.port) as planner_a, plan_client(pki, b.port) as planner_b:
        submitted = await planner_a.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(step("run_diagnostic", ["node-1"]), step("run_diagnostic", ["node-1"]))
            )
        )
        plan_id = submitted.plan.plan_id
        seen: list[str] = []
        async for update in planner_b.WatchPlan(plan_pb2.WatchPlanRequest(plan_id=plan_id)):
            if update.HasField("transition"):
                seen.append(plan_pb2.PlanPhase.Name(update.transition.to_phase))
            if update.plan.phase in (plan_pb2.PLAN_PHASE_COMPLETED, plan_pb2.PLAN_PHASE_FAILED):
                break
        stored = (await planner_a.GetPlan(plan_pb2.GetPlanRequest(plan_id=plan_id))).plan
    # Everything after what the watch's first message already showed, in order, none missed.
    expected = [plan_pb2.PlanPhase.Name(t.to_phase) for t in stored.transitions]
    assert seen == expected[len(expected) - len(seen) :]
    assert seen[-2:] == ["PLAN_PHASE_EXECUTING", "PLAN_PHASE_COMPLETED"]


async def test_telemetry_of_agents_on_one_replica_is_served_by_another(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    a = await control_plane_factory(controller_id="replica-a")
    b = await control_plane_factory(controller_id="replica-b")
    node = await agent_factory("node-1", b.port)
    await agent_factory("node-2", b.port)

    # A stream on A of one of B's nodes: contiguous, and B relays only what is wanted.
    async with stream_seqs(pki, a.port, "node-1", lambda: a.hub.subscriber_count) as seen:
        await eventually(lambda: "node-1" in b.replicas.others().get("replica-a").interest)
        await eventually(lambda: len(seen) >= 10, timeout=15)
    assert_contiguous(seen)
    assert seen[-1] <= node.agent.last_sample.seq
    assert a.relay.relayed_in >= 10
    assert a.hub.latest("node-2") is None  # nobody on A asked for node-2: never sent

    # One-off reads on A: B's latest samples of the nodes asked for.
    async with grpc.aio.secure_channel(
        f"localhost:{a.port}", pki.channel_credentials("planner", "inframind")
    ) as channel:
        telemetry = telemetry_pb2_grpc.TelemetryServiceStub(channel)
        one = await telemetry.GetNodeTelemetry(
            telemetry_pb2.GetNodeTelemetryRequest(node_id="node-2")
        )
        assert one.sample.node_id == "node-2" and one.sample.seq >= 1
        fleet = await telemetry.GetFleetTelemetry(telemetry_pb2.GetFleetTelemetryRequest())
        assert sorted(s.node_id for s in fleet.samples) == ["node-1", "node-2"]


async def test_a_command_whose_holder_dies_is_delivered_through_the_next_holder_once(
    pki: Pki, database_url: str, tmp_path: Path,
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory,
) -> None:  # fmt: skip
    a = await control_plane_factory(controller_id="replica-a", controller_lease_s=30.0)
    await eventually(lambda: a.controller.leader)
    b_port = free_port()
    b = start_replica(pki, database_url, tmp_path / "b.log", b_port, "replica-b")
    forwarder = Forwarder(b_port)
    await forwarder.start()
    try:
        await eventually(lambda: "replica-b" in a.replicas.others(), timeout=20)
        await agent_factory("node-1", forwarder.port)
        await eventually(lambda: a.registry.holder_of("node-1") == "replica-b")
        # B freezes holding the node's session: the command A stores cannot go out yet...
        os.kill(b.pid, signal.SIGSTOP)
        async with plan_client(pki, a.port) as planner:
            submitted = await planner.SubmitPlan(
                plan_pb2.SubmitPlanRequest(
                    plan=plan(step("run_diagnostic", ["node-1"], timeout_s=60))
                )
            )
            plan_id = submitted.plan.plan_id
            await eventually(lambda: _commands(database_url, plan_id) != [])
            assert _commands(database_url, plan_id)[0][2] == "PENDING"
            # ...then dies; the balancer sends the node's reconnect to A, which delivers it.
            forwarder.backend = a.port
            os.kill(b.pid, signal.SIGKILL)
            b.wait(10)
            done = await wait_terminal(planner, plan_id, timeout=60)
        assert phases(done)[-1] == "COMPLETED", done.status_message
        assert _rows(
            database_url,
            "SELECT state, outcome, deliveries FROM commands WHERE plan_id = :p",
            p=plan_id,
        ) == [("FINISHED", "SUCCEEDED", 1)]
        assert a.registry.holder_of("node-1") == "replica-a"
    finally:
        if b.poll() is None:
            b.kill()
            b.wait(10)
        await forwarder.close()


async def test_the_leader_sigkilled_mid_plan_is_replaced_and_the_plan_completes_once(
    pki: Pki, database_url: str, tmp_path: Path,
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory,
) -> None:  # fmt: skip
    a_port = free_port()
    lease_s = 3.0
    a = start_replica(
        pki, database_url, tmp_path / "a.log", a_port, "replica-a",
        "--controller-lease-s", str(lease_s),
    )  # fmt: skip
    try:
        await eventually(lambda: _lease_holder(database_url) == "replica-a", timeout=20)
        b = await control_plane_factory(controller_id="replica-b", controller_lease_s=lease_s)
        nodes = [f"node-{i}" for i in range(4)]
        for node in nodes:
            await agent_factory(node, b.port)
        async with plan_client(pki, b.port) as planner:
            submitted = await planner.SubmitPlan(
                plan_pb2.SubmitPlanRequest(
                    plan=plan(
                        step("run_diagnostic", nodes, timeout_s=60),
                        step("run_diagnostic", nodes, timeout_s=60),
                        parallel=1,
                    )
                )
            )
            plan_id = submitted.plan.plan_id
            # Killed once the first wave has run: the rest is the new leader's.
            await eventually(lambda: len(_commands(database_url, plan_id)) >= 2, timeout=20)
            os.kill(a.pid, signal.SIGKILL)
            a.wait(10)
            killed = time.monotonic()
            await eventually(lambda: b.controller.leader, timeout=lease_s + 5)
            took_over = time.monotonic() - killed
            done = await wait_terminal(planner, plan_id, timeout=60)
        assert phases(done)[-1] == "COMPLETED", done.status_message
        # The bound: the dead leader's lease runs out, then B's next attempt takes it.
        assert took_over <= lease_s + b.settings.reconcile_interval_s + 1.0
        commands = _commands(database_url, plan_id)
        assert sorted(commands) == sorted(
            (node, "run_diagnostic", "FINISHED", "SUCCEEDED") for node in nodes for _ in (1, 2)
        )
    finally:
        if a.poll() is None:
            a.kill()
            a.wait(10)


async def test_a_stopping_replica_hands_over_leadership_and_its_agents(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    a = await control_plane_factory(controller_id="replica-a", controller_lease_s=30.0)
    await eventually(lambda: a.controller.leader)
    b = await control_plane_factory(controller_id="replica-b", controller_lease_s=30.0)
    forwarder = Forwarder(a.port)
    await forwarder.start()
    try:
        agents = [await agent_factory(f"node-{i}", forwarder.port) for i in range(3)]
        await eventually(
            lambda: all(b.registry.holder_of(f"node-{i}") == "replica-a" for i in range(3))
        )
        async with stream_seqs(pki, b.port, "node-0", lambda: b.hub.subscriber_count) as seen:
            await eventually(lambda: len(seen) >= 3)
            forwarder.backend = b.port
            stopping = time.monotonic()
            await a.stop()
            await eventually(lambda: b.controller.leader, timeout=5)
            handed_over = time.monotonic() - stopping
            await eventually(
                lambda: all(b.registry.session_for(f"node-{i}") is not None for i in range(3))
            )
            last = agents[0].agent.last_sample.seq
            await eventually(lambda: seen and max(seen) >= last + 3)
        assert_contiguous(seen)
        # A graceful stop releases the lease: no waiting out its 30 s.
        assert handed_over < a.settings.shutdown_grace_s * 3 + 1.0
        assert b.replicas.others() == {}
        for i in range(3):
            state = b.registry.get(f"node-{i}")
            assert state is not None and state.replica_id == "replica-b"
    finally:
        await forwarder.close()


@pytest.mark.parametrize("replicas", [2])
async def test_validation_on_any_replica_sees_the_whole_fleet(
    replicas: int, pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    planes = [await control_plane_factory(controller_id=f"r{i}") for i in range(replicas)]
    await agent_factory("late-node", planes[-1].port)
    # A node that registered on the last replica after the first started is known there at
    # once (the directory's notification), not only after a restart.
    await eventually(lambda: planes[0].registry.known("late-node"), timeout=2)
    async with plan_client(pki, planes[0].port) as planner:
        response = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(step("run_diagnostic", ["late-node"])), validate_only=True
            )
        )
    assert response.plan.phase == plan_pb2.PLAN_PHASE_APPROVED


async def test_health_gates_of_the_leader_see_telemetry_of_nodes_held_by_another_replica(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    a = await control_plane_factory(controller_id="replica-a")
    await eventually(lambda: a.controller.leader)
    b = await control_plane_factory(controller_id="replica-b")
    await agent_factory("node-1", b.port)
    # A learns of the node through the directory's notification, milliseconds later.
    await eventually(lambda: a.registry.holder_of("node-1") == "replica-b")
    async with plan_client(pki, a.port) as planner:
        submitted = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(
                    step("run_diagnostic", ["node-1"]),
                    gates=[("load-reported", "sample.seq > 0 && has(sample.host)", 5.0)],
                )
            )
        )
        done = await wait_terminal(planner, submitted.plan.plan_id)
    # The gate needs a sample newer than the wave from node-1, which only B receives.
    assert phases(done)[-1] == "COMPLETED", done.status_message
    assert a.relay.relayed_in > 0
