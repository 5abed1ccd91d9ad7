"""A control plane cut from PostgreSQL: it keeps its agent sessions and serves what it holds in
memory, refuses writes with UNAVAILABLE (never INTERNAL or UNKNOWN), and catches up when the
link returns — no acknowledged telemetry is lost.

The partition is a TCP forwarder between the control plane and the suite's PostgreSQL that the
test cuts (open connections reset, new ones refused) and heals."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from sentinel.v1 import fleet_pb2, fleet_pb2_grpc, plan_pb2
from sqlalchemy import make_url

from controlplane import ControlPlane
from tests.conftest import TEST_DB, AgentFactory, Pki, eventually, fast_settings
from tests.fleet.test_restart_delivery import assert_contiguous, stream_seqs
from tests.plan_helpers import plan, plan_client, step
from tests.replicas._rig import Forwarder

pytestmark = pytest.mark.skipif(
    TEST_DB != "postgresql", reason="cuts the link to PostgreSQL (SQLite is a local file)"
)


async def test_a_control_plane_cut_from_postgresql_refuses_writes_and_catches_up(
    pki: Pki,
    database_url: str,
    agent_factory: AgentFactory,
) -> None:
    started: list[ControlPlane] = []
    url = make_url(database_url)
    link = Forwarder(int(url.port or 5432))
    await link.start()
    try:
        through_link = url.set(host="127.0.0.1", port=link.port).render_as_string(
            hide_password=False
        )
        cp = ControlPlane(fast_settings(pki, through_link))
        await cp.start()
        started.append(cp)
        node = await agent_factory("node-1", cp.port)
        async with (
            stream_seqs(pki, cp.port, "node-1", lambda: cp.hub.subscriber_count) as seen,
            plan_client(pki, cp.port) as planner,
            grpc.aio.secure_channel(
                f"localhost:{cp.port}", pki.channel_credentials("operator", "alice")
            ) as channel,
        ):
            fleet = fleet_pb2_grpc.FleetServiceStub(channel)
            await eventually(lambda: len(seen) >= 3)
            link.partition()
            cut_at = node.agent.last_sample.seq
            # Writes are refused, precisely and promptly enough for a client to retry.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await planner.SubmitPlan(
                    plan_pb2.SubmitPlanRequest(plan=plan(step("run_diagnostic", ["node-1"]))),
                    timeout=30,
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
            assert "database" in (refused.value.details() or "")
            # What lives in memory is still served, and the agent's session holds.
            listed = await fleet.ListAgents(fleet_pb2.ListAgentsRequest(), timeout=5)
            assert [a.node_id for a in listed.agents] == ["node-1"]
            await asyncio.sleep(2)  # telemetry piles up unacknowledged meanwhile
            assert node.agent.connected.is_set()
            link.heal()
            produced = node.agent.last_sample.seq
            assert produced > cut_at
            await eventually(lambda: max(seen) >= produced, timeout=30)
            await eventually(
                lambda: cp.registry.get("node-1").last_telemetry_seq >= produced,
                timeout=30,
            )
            # And writes work again.
            accepted = await planner.SubmitPlan(
                plan_pb2.SubmitPlanRequest(plan=plan(step("run_diagnostic", ["node-1"]))),
                timeout=30,
            )
            assert accepted.plan.phase == plan_pb2.PLAN_PHASE_APPROVED
        assert_contiguous(seen)
        assert node.agent.sessions_opened == 1
        state = cp.registry.get("node-1")
        assert state is not None and state.telemetry_gap_samples == 0
    finally:
        for cp in started:
            await cp.stop()
        await link.close()
