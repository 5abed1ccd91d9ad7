"""WatchEvents and ListEvents over the real API: a real control plane over real TLS, real
agents and real plans, on the backend SENTINEL_TEST_DB selects."""

from __future__ import annotations

import grpc
import pytest
from sentinel.v1 import events_pb2, fleet_pb2, identity_pb2, identity_pb2_grpc, plan_pb2

from tests.conftest import AgentFactory, ControlPlaneFactory, Pki
from tests.events._helpers import Kind, Watch, events_client, of_kind
from tests.plan_helpers import plan, plan_client, step, wait_terminal

WatchRequest = events_pb2.WatchEventsRequest


def _transitions(events: list[events_pb2.Event], plan_id: str) -> list[tuple[str, str]]:
    return [
        (
            plan_pb2.PlanPhase.Name(e.plan_transitioned.transition.from_phase)[11:],
            plan_pb2.PlanPhase.Name(e.plan_transitioned.transition.to_phase)[11:],
        )
        for e in of_kind(events, Kind.EVENT_KIND_PLAN_TRANSITIONED)
        if e.plan_transitioned.plan_id == plan_id
    ]


async def _run_plan(pki: Pki, port: int, nodes: list[str], seconds: int = 7) -> str:
    async with plan_client(pki, port) as planner:
        submitted = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(
                    step("set_telemetry_interval", nodes, {"seconds": seconds}),
                    parallel=len(nodes),
                )
            )
        )
        done = await wait_terminal(planner, submitted.plan.plan_id)
    assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message
    return submitted.plan.plan_id


async def test_watch_shows_an_agent_connecting_a_plans_transitions_in_order_and_its_results(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    cp = await control_plane_factory(controller_id="replica-1")
    async with events_client(pki, cp.port) as stub, Watch(stub, WatchRequest()) as watch:
        agent = await agent_factory("node-a", cp.port)
        connected = (
            await watch.until(lambda ev: bool(of_kind(ev, Kind.EVENT_KIND_AGENT_STATUS_CHANGED)))
        )[0]
        assert connected.subject == "node/node-a"
        assert connected.replica_id == "replica-1"
        assert connected.agent_status_changed.node_id == "node-a"
        assert connected.agent_status_changed.status == fleet_pb2.AGENT_STATUS_CONNECTED
        assert connected.agent_status_changed.previous_status == fleet_pb2.AGENT_STATUS_UNSPECIFIED
        assert connected.agent_status_changed.session_id

        plan_id = await _run_plan(pki, cp.port, ["node-a"])
        events = await watch.until(
            lambda ev: ("EXECUTING", "COMPLETED") in _transitions(ev, plan_id)
        )
        assert _transitions(events, plan_id) == [
            ("PENDING", "VALIDATING"),
            ("VALIDATING", "APPROVED"),
            ("APPROVED", "EXECUTING"),
            ("EXECUTING", "COMPLETED"),
        ]
        assert {e.subject for e in of_kind(events, Kind.EVENT_KIND_PLAN_TRANSITIONED)} == {
            f"plan/{plan_id}"
        }
        (result,) = of_kind(events, Kind.EVENT_KIND_COMMAND_FINISHED)
        finished = result.command_finished
        assert (finished.node_id, finished.action, finished.outcome) == (
            "node-a",
            "set_telemetry_interval",
            "SUCCEEDED",
        )
        assert finished.output["seconds"] == 7.0
        assert result.subject == f"node/node-a/command/{finished.command_id}"
        # The result was stored before the plan completed, and the stream says so.
        completed = of_kind(events, Kind.EVENT_KIND_PLAN_TRANSITIONED)[-1]
        assert result.event_id < completed.event_id
        ids = [e.event_id for e in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)

        # The agent goes away: its session ended, so it is Suspect.
        await agent.stop()
        events = await watch.until(
            lambda ev: len(of_kind(ev, Kind.EVENT_KIND_AGENT_STATUS_CHANGED)) >= 2
        )
        gone = of_kind(events, Kind.EVENT_KIND_AGENT_STATUS_CHANGED)[1].agent_status_changed
        assert (gone.status, gone.previous_status) == (
            fleet_pb2.AGENT_STATUS_SUSPECT,
            fleet_pb2.AGENT_STATUS_CONNECTED,
        )


async def test_resuming_after_an_event_id_gives_exactly_the_later_events_then_new_ones(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    cp = await control_plane_factory()
    await agent_factory("node-a", cp.port)
    await _run_plan(pki, cp.port, ["node-a"])
    await cp.events.flush()
    async with events_client(pki, cp.port) as stub:
        stored = list((await stub.ListEvents(events_pb2.ListEventsRequest())).events)
        assert len(stored) >= 6  # a connect, four transitions, a result
        # Paging gives the same, page by page.
        paged: list[events_pb2.Event] = []
        token = ""
        while True:
            page = await stub.ListEvents(
                events_pb2.ListEventsRequest(page_size=2, page_token=token)
            )
            paged += page.events
            token = page.next_page_token
            if not token:
                break
        assert paged == stored

        middle = stored[len(stored) // 2].event_id
        later = [e for e in stored if e.event_id > middle]
        async with Watch(stub, WatchRequest(after_event_id=middle)) as resumed:
            assert (await resumed.until(lambda ev: len(ev) >= len(later)))[: len(later)] == later
            await agent_factory("node-b", cp.port)
            events = await resumed.until(lambda ev: len(ev) > len(later))
            assert events[len(later)].subject == "node/node-b"
            assert [e.event_id for e in events] == sorted({e.event_id for e in events})

        # after_event_id=0 is everything stored; without it, nothing of the past.
        async with (
            Watch(stub, WatchRequest(after_event_id=0)) as everything,
            Watch(stub, WatchRequest()) as from_now,
        ):
            await everything.until(lambda ev: len(ev) >= len(stored) + 1)
            assert everything.events[: len(stored)] == stored
            await agent_factory("node-c", cp.port)
            await from_now.until(lambda ev: len(ev) >= 1)
            assert [e.subject for e in from_now.events] == ["node/node-c"]


async def test_watch_and_list_filter_by_kind_and_subject_prefix(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    cp = await control_plane_factory()
    await agent_factory("node-a", cp.port)
    await agent_factory("node-b", cp.port)
    await cp.events.flush()  # their connections are in the past for the watchers below
    async with (
        events_client(pki, cp.port) as stub,
        Watch(stub, WatchRequest(kinds=[Kind.EVENT_KIND_COMMAND_FINISHED])) as results,
        Watch(stub, WatchRequest(subject_prefix="node/node-b")) as node_b,
        Watch(
            stub,
            WatchRequest(
                kinds=[Kind.EVENT_KIND_PLAN_TRANSITIONED, Kind.EVENT_KIND_AGENT_STATUS_CHANGED],
                subject_prefix="plan/",
            ),
        ) as plans,
    ):
        plan_id = await _run_plan(pki, cp.port, ["node-a", "node-b"])
        await results.until(lambda ev: len(ev) == 2)
        assert {e.command_finished.node_id for e in results.events} == {"node-a", "node-b"}
        await plans.until(lambda ev: len(ev) == 4)
        assert {e.subject for e in plans.events} == {f"plan/{plan_id}"}
        await node_b.until(lambda ev: len(ev) == 1)
        assert node_b.events[0].subject.startswith("node/node-b/command/")
        # Nothing else arrives for the filtered streams (a later event passes them all by).
        await agent_factory("node-c", cp.port)
        await cp.events.flush()
        listed = await stub.ListEvents(
            events_pb2.ListEventsRequest(
                kinds=[Kind.EVENT_KIND_AGENT_STATUS_CHANGED], subject_prefix="node/node-"
            )
        )
        assert [e.subject for e in listed.events] == ["node/node-a", "node/node-b", "node/node-c"]
        assert len(results.events) == 2 and len(plans.events) == 4 and len(node_b.events) == 1


async def test_a_revocation_made_here_is_an_event(
    pki: Pki, control_plane_factory: ControlPlaneFactory
) -> None:
    cp = await control_plane_factory()
    async with (
        events_client(pki, cp.port) as stub,
        Watch(stub, WatchRequest(kinds=[Kind.EVENT_KIND_REVOKED])) as watch,
        grpc.aio.secure_channel(
            f"localhost:{cp.port}", pki.channel_credentials("operator", "alice")
        ) as channel,
    ):
        identity = identity_pb2_grpc.IdentityServiceStub(channel)
        await identity.RevokeNode(identity_pb2.RevokeNodeRequest(node_id="n9", reason="stolen"))
        (event,) = await watch.until(lambda ev: len(ev) == 1)
        assert event.subject == "node/n9"
        assert (event.revoked.revocation_kind, event.revoked.value, event.revoked.reason) == (
            "node",
            "n9",
            "stolen",
        )
        assert event.revoked.revoked_by == "spiffe://sentinel.local/operator/alice"


@pytest.mark.parametrize(
    ("request_message", "field"),
    [
        (WatchRequest(kinds=[events_pb2.EventKind.ValueType(42)]), "kinds[0]"),
        (WatchRequest(after_event_id=-1), "after_event_id"),
    ],
)
async def test_a_bad_watch_request_is_invalid_argument_naming_the_field(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    request_message: events_pb2.WatchEventsRequest,
    field: str,
) -> None:
    cp = await control_plane_factory()
    async with events_client(pki, cp.port) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.WatchEvents(request_message):
                pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith(field)


async def test_an_agent_may_not_watch_events(
    pki: Pki, control_plane_factory: ControlPlaneFactory
) -> None:
    cp = await control_plane_factory()
    async with events_client(pki, cp.port, role="agent", name="node-x") as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.WatchEvents(WatchRequest()):
                pass
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
