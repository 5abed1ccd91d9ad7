"""The client library against a real control plane over real mutual TLS on loopback, with
real node agents: retried submissions, both clients, watches, paging, telemetry, errors and
bearer tokens."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from sentinel.v1 import fleet_pb2, fleet_pb2_grpc, plan_pb2, plan_pb2_grpc

from controlplane import ControlPlane
from sentinelclient import AsyncSentinelClient, SentinelClient, SentinelError
from tests.client._rig import LossyProxy, settings_for
from tests.conftest import AgentFactory, Pki, eventually
from tests.plan_helpers import plan, step

pytestmark = pytest.mark.usefixtures("no_nvidia_driver")


def _interval_plan(node: str = "node-1", seconds: int = 7) -> plan_pb2.Plan:
    return plan(step("set_telemetry_interval", [node], {"seconds": seconds}, step_id="slow"))


def _moves(transitions: list[plan_pb2.PlanTransition]) -> list[str]:
    name = plan_pb2.PlanPhase.Name
    return [
        f"{name(t.from_phase).removeprefix('PLAN_PHASE_')}->"
        f"{name(t.to_phase).removeprefix('PLAN_PHASE_')}"
        for t in transitions
    ]


async def test_submit_plan_retried_after_its_response_was_lost_creates_exactly_one_plan(
    pki: Pki,
    control_plane: ControlPlane,
    agent_factory: AgentFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Injected fault: a real TCP proxy on loopback lets the first SubmitPlan reach the server,
    # drops the server's answer, and then cuts the connection (the client sees UNAVAILABLE
    # after the plan was stored). The retry must carry the same request_id.
    await agent_factory("node-1", control_plane.port)
    proxy = LossyProxy(control_plane.port)
    proxy_port = await proxy.start()
    try:
        async with (
            AsyncSentinelClient(settings_for(pki, proxy_port)) as client,
            AsyncSentinelClient(settings_for(pki, control_plane.port)) as direct,
        ):
            await client.list_agents()  # connection and TLS up before answers are dropped
            proxy.holding = True
            submitting = asyncio.create_task(client.submit_plan(_interval_plan()))
            stored = await eventually(direct.list_plans)
            assert proxy.held_bytes > 0  # the server answered; the client never saw it
            assert not submitting.done()
            proxy.sever()
            response = await asyncio.wait_for(submitting, 15)
            assert response.replayed
            [only] = await direct.list_plans()
    finally:
        await proxy.close()
    assert response.plan.plan_id == stored[0].plan_id == only.plan_id
    assert only.request_id == response.plan.request_id
    assert only.request_id.startswith("client-")
    assert proxy.connections == 2
    retried = [r.getMessage() for r in caplog.records if r.name == "sentinelclient"]
    assert len(retried) == 1 and "PlanService/SubmitPlan failed (UNAVAILABLE" in retried[0]


async def test_submit_plan_waits_for_the_retry_delay_a_busy_server_names(pki: Pki) -> None:
    # A stand-in PlanService (real grpc.aio server, real TLS) refuses the first submission with
    # RESOURCE_EXHAUSTED and retry-after-ms, as the control plane's rate limits do.
    seen: list[tuple[float, str]] = []

    class BusyPlans(plan_pb2_grpc.PlanServiceServicer):
        async def SubmitPlan(
            self, request: plan_pb2.SubmitPlanRequest, context: grpc.aio.ServicerContext
        ) -> plan_pb2.SubmitPlanResponse:
            seen.append((time.monotonic(), request.request_id))
            if len(seen) == 1:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", (("retry-after-ms", "400"),)
                )
            return plan_pb2.SubmitPlanResponse(
                plan=plan_pb2.Plan(plan_id="p-1", request_id=request.request_id)
            )

    server = grpc.aio.server()
    plan_pb2_grpc.add_PlanServiceServicer_to_server(BusyPlans(), server)  # type: ignore[abstract]
    files = pki.server_files()
    credentials = grpc.ssl_server_credentials(
        [(files.key.read_bytes(), files.cert.read_bytes())],
        root_certificates=files.ca.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        async with AsyncSentinelClient(settings_for(pki, port)) as client:
            response = await client.submit_plan(_interval_plan(), request_id="cap-7")
    finally:
        await server.stop(None)
    assert [request_id for _, request_id in seen] == ["cap-7", "cap-7"]
    assert seen[1][0] - seen[0][0] >= 0.4
    assert response.plan.plan_id == "p-1"


async def test_sync_client_submits_follows_and_reads_a_plan_without_an_event_loop(
    pki: Pki, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    await agent_factory("node-1", control_plane.port)
    settings = settings_for(pki, control_plane.port)

    def use_sync_client() -> tuple[plan_pb2.SubmitPlanResponse, list[str], plan_pb2.Plan]:
        with SentinelClient(settings) as client:
            submitted = client.submit_plan(_interval_plan(), request_id="sync-1")
            moves: list[str] = []
            for update in client.watch_plan(submitted.plan.plan_id):
                if update.transition is None:
                    moves += _moves(list(update.plan.transitions))
                else:
                    moves += _moves([update.transition])
            return submitted, moves, client.get_plan(submitted.plan.plan_id)

    submitted, moves, final = await asyncio.to_thread(use_sync_client)
    assert submitted.plan.request_id == "sync-1" and not submitted.replayed
    assert moves[-1] == "EXECUTING->COMPLETED"
    assert final.phase == plan_pb2.PLAN_PHASE_COMPLETED
    assert final.steps[0].node_results[0].outcome == "SUCCEEDED"


async def test_async_watch_plan_yields_every_transition_in_order(
    pki: Pki, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    await agent_factory("node-1", control_plane.port)
    async with AsyncSentinelClient(settings_for(pki, control_plane.port)) as client:
        submitted = await client.submit_plan(_interval_plan())
        updates = [u async for u in client.watch_plan(submitted.plan.plan_id)]
        final = await client.get_plan(submitted.plan.plan_id)
    first, *rest = updates
    assert first.transition is None  # the plan as it was when the watch began
    watched = list(first.plan.transitions) + [u.transition for u in rest if u.transition]
    assert _moves(watched) == [
        "PENDING->VALIDATING",
        "VALIDATING->APPROVED",
        "APPROVED->EXECUTING",
        "EXECUTING->COMPLETED",
    ]
    assert _moves(watched) == _moves(list(final.transitions))
    assert [t.time.ToNanoseconds() for t in watched] == sorted(
        t.time.ToNanoseconds() for t in watched
    )
    assert updates[-1].terminal and not any(u.terminal for u in updates[:-1])


async def test_list_agents_follows_every_page(
    pki: Pki, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    for node in ("node-c", "node-a", "node-b"):
        await agent_factory(node, control_plane.port)
    settings = settings_for(pki, control_plane.port, "viewer", "dash")
    async with AsyncSentinelClient(settings) as client:
        # The server really pages at this size: one agent and a token per page.
        async with grpc.aio.secure_channel(
            settings.server, pki.channel_credentials("viewer", "dash")
        ) as channel:
            one_page = await fleet_pb2_grpc.FleetServiceStub(channel).ListAgents(
                fleet_pb2.ListAgentsRequest(page_size=1)
            )
        assert len(one_page.agents) == 1 and one_page.next_page_token
        agents = await client.list_agents(page_size=1)
        connected = await client.list_agents(status=fleet_pb2.AGENT_STATUS_CONNECTED, page_size=2)

    def sync_listing() -> list[fleet_pb2.Agent]:
        with SentinelClient(settings) as sync_client:
            return sync_client.list_agents(page_size=2)

    assert [a.node_id for a in agents] == ["node-a", "node-b", "node-c"]
    assert [a.node_id for a in connected] == ["node-a", "node-b", "node-c"]
    assert [a.node_id for a in await asyncio.to_thread(sync_listing)] == [
        "node-a",
        "node-b",
        "node-c",
    ]


async def test_stream_telemetry_yields_fresh_samples_of_the_chosen_node_only(
    pki: Pki, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    await agent_factory("node-1", control_plane.port)
    await agent_factory("node-2", control_plane.port)
    async with AsyncSentinelClient(settings_for(pki, control_plane.port)) as client:
        samples = []
        stream = client.stream_telemetry(["node-2"], ["host.load"])
        async for sample in stream:
            samples.append(sample)
            if len(samples) == 3:
                break
        await stream.aclose()
    assert {s.node_id for s in samples} == {"node-2"}
    assert [s.seq for s in samples] == sorted(s.seq for s in samples)
    assert all(s.HasField("host") and not s.host.HasField("memory") for s in samples)


async def test_refusals_carry_the_code_the_message_and_each_field_path(
    pki: Pki, control_plane: ControlPlane
) -> None:
    bad = plan(
        step("set_gpu_power_limit", ["ghost"], {"watts": -5}),
        step("no_such_action", ["ghost"]),
    )
    async with AsyncSentinelClient(settings_for(pki, control_plane.port)) as client:
        with pytest.raises(SentinelError) as refused:
            await client.submit_plan(bad)
        with pytest.raises(SentinelError) as missing:
            await client.get_plan("no-such-plan")
    error = refused.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.method == "PlanService/SubmitPlan"
    assert error.attempts == 1  # a refusal is not retried
    assert [p.field for p in error.problems] == [
        "plan.steps[0].targets[0].node_id",
        "plan.steps[0].parameters.watts",
        "plan.steps[1].action",
    ], error.message
    assert error.problems[2].message.startswith("unknown action 'no_such_action'")
    assert "supported: cordon" in error.problems[2].message
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert [p.field for p in missing.value.problems] == ["plan_id"]
    assert str(missing.value).startswith("NOT_FOUND: plan_id:")


async def test_a_logged_in_user_calls_with_its_own_role_not_the_certificates(
    pki: Pki, control_plane: ControlPlane
) -> None:
    async with AsyncSentinelClient(settings_for(pki, control_plane.port, "operator", "adm")) as op:
        await op.create_user("vera", "viewer", "a long enough password 1")
        async with AsyncSentinelClient(settings_for(pki, control_plane.port, "operator", "x")) as c:
            await c.login("vera", "a long enough password 1")
            with pytest.raises(SentinelError) as denied:
                await c.create_user("mallory", "operator", "a long enough password 2")
            assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert "viewer" in denied.value.message
            pair = await c.refresh()
            assert pair.access_token
        # A token handed over as a setting works the same way.
        settings = settings_for(pki, control_plane.port, "operator", "x", token=pair.access_token)
        async with AsyncSentinelClient(settings) as by_setting:
            with pytest.raises(SentinelError) as denied_again:
                await by_setting.delete_user("vera")
            assert denied_again.value.code == grpc.StatusCode.PERMISSION_DENIED


async def test_outcome_calibration_and_breaker_through_both_clients(
    pki: Pki, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    await agent_factory("node-1", control_plane.port)
    async with AsyncSentinelClient(settings_for(pki, control_plane.port)) as client:
        submitted = await client.submit_plan(_interval_plan())
        final = await client.wait_for_plan(submitted.plan.plan_id)
        outcome = await client.get_plan_outcome(final.plan_id)

        async def counted() -> Any:
            calibration = await client.get_planner_calibration(final.source)
            return calibration if calibration.plans == 1 else None

        calibration = await eventually(counted)
        with pytest.raises(SentinelError) as refused:
            await client.reset_breaker("a planner may not")
    assert final.phase == plan_pb2.PLAN_PHASE_COMPLETED
    assert (outcome.plan_id, outcome.phase) == (final.plan_id, plan_pb2.PLAN_PHASE_COMPLETED)
    assert not outcome.predictions  # the plan stated none
    assert (calibration.source, calibration.rollbacks, calibration.predictions) == (
        final.source,
        0,
        0,
    )
    assert calibration.hit_rate == 1.0  # nothing judged: no evidence against the source
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED

    def status() -> bool:
        with SentinelClient(settings_for(pki, control_plane.port, "viewer", "v")) as viewer:
            return viewer.get_autonomy_status().breaker.tripped

    assert await asyncio.to_thread(status) is False
