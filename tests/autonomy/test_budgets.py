"""Fleet-wide disruption budgets: plans contending for a budget wait for each other (the
store decides, also across control planes), a wave larger than a budget fails at once, cordoned
nodes count, and holds of plans that ended are swept."""

from __future__ import annotations

import asyncio
import datetime as dt
import pathlib

import pytest
from sentinel.v1 import plan_pb2, plan_pb2_grpc
from sqlalchemy import Connection, select

from controlplane import ControlPlane
from controlplane.plans import (
    BudgetConfigError,
    DisruptionBudget,
    DisruptionBudgets,
    parse_budgets,
)
from controlplane.store import COMMANDS, DISRUPTION_HOLDS, Store
from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually, needs_postgres
from tests.plan_helpers import plan, plan_client, step, wait_terminal
from tests.processes.test_processes import _metrics as scrape_metrics

pytestmark = pytest.mark.timeout(90)

# Each plan's wave holds its node until its gate has seen a fresh sample after the command:
# with telemetry every second, up to a second after it, long enough for plans to overlap.
GATE_WINDOW_S = 5.0
TELEMETRY_S = 1.0


def _budget_file(tmp_path: pathlib.Path, max_nodes: int = 1) -> str:
    path = tmp_path / "autonomy.yaml"
    path.write_text(
        f"budgets:\n  - name: pool\n    node_patterns: ['node-*']\n    max_nodes: {max_nodes}\n"
    )
    return str(path)


def _slow_plan(node: str, request_id: str) -> plan_pb2.Plan:
    return plan(
        step("run_diagnostic", [node]),
        request_id=request_id,
        gates=[("alive", "sample.seq > 0", GATE_WINDOW_S)],
    )


async def _command_times(cp: ControlPlane) -> dict[str, tuple[dt.datetime, dt.datetime]]:
    """When each plan's (single) command was created and finished, by plan id."""

    def read(db: Connection) -> dict[str, tuple[dt.datetime, dt.datetime]]:
        rows = db.execute(select(COMMANDS.c.plan_id, COMMANDS.c.created_at, COMMANDS.c.finished_at))
        return {row.plan_id: (row.created_at, row.finished_at) for row in rows if row.plan_id}

    return await cp.store.run_core(read)


async def _holds(cp: ControlPlane) -> list[tuple[str, str, str]]:
    def read(db: Connection) -> list[tuple[str, str, str]]:
        rows = db.execute(select(DISRUPTION_HOLDS))
        return [(row.budget, row.node, row.plan_id) for row in rows]

    return await cp.store.run_core(read)


async def _waiting_reasons(stub: plan_pb2_grpc.PlanServiceStub, plan_id: str) -> list[str]:
    """Every waiting_reason WatchPlan showed for the plan until it ended."""
    seen: list[str] = []
    async for message in stub.WatchPlan(plan_pb2.WatchPlanRequest(plan_id=plan_id)):
        if message.plan.waiting_reason and message.plan.waiting_reason not in seen:
            seen.append(message.plan.waiting_reason)
        if message.HasField("outcome"):
            break
    return seen


async def _run_contending_plans(
    pki: Pki, submit_to: tuple[ControlPlane, ControlPlane], read_from: ControlPlane
) -> None:
    first_cp, second_cp = submit_to
    async with (
        plan_client(pki, first_cp.port) as first_stub,
        plan_client(pki, second_cp.port) as second_stub,
    ):
        first, second = await asyncio.gather(
            first_stub.SubmitPlan(plan_pb2.SubmitPlanRequest(plan=_slow_plan("node-a", "p-a"))),
            second_stub.SubmitPlan(plan_pb2.SubmitPlanRequest(plan=_slow_plan("node-b", "p-b"))),
        )
        ids = {first.plan.plan_id: first_stub, second.plan.plan_id: second_stub}
        watches = {
            plan_id: asyncio.create_task(_waiting_reasons(stub, plan_id))
            for plan_id, stub in ids.items()
        }
        for plan_id, stub in ids.items():
            done = await wait_terminal(stub, plan_id, timeout=30)
            assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message
            assert done.waiting_reason == ""
        reasons = {plan_id: await asyncio.wait_for(w, 10) for plan_id, w in watches.items()}
    times = await _command_times(read_from)
    (a_id, (_, a_finished)), (b_id, (b_created, _)) = sorted(
        times.items(), key=lambda item: item[1]
    )
    # The later one's command was created only after the earlier one's had finished (and its
    # gate had judged the fresh telemetry that came after it).
    assert b_created > a_finished, times
    assert reasons[a_id] == []
    assert len(reasons[b_id]) == 1, reasons
    assert reasons[b_id][0].startswith("waiting for disruption budget 'pool' (1 of 1 node(s)")
    assert f"by {a_id}" in reasons[b_id][0]
    assert await _holds(read_from) == []


async def test_two_plans_contending_for_a_budget_of_one_node_run_one_after_the_other(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
) -> None:
    cp = await control_plane_factory(
        autonomy_policy_path=_budget_file(tmp_path), telemetry_interval_s=TELEMETRY_S
    )
    await agent_factory("node-a", cp.port)
    await agent_factory("node-b", cp.port)
    await _run_contending_plans(pki, (cp, cp), cp)
    state = await cp.budgets.state()
    assert [(s.budget.name, s.nodes_covered, s.limit, s.in_use) for s in state] == [
        ("pool", 2, 1, 0)
    ]
    metrics = await asyncio.to_thread(scrape_metrics, cp.metrics_port)
    assert metrics['sentinel_disruption_budget_limit{"budget": "pool"}'] == 1
    assert metrics['sentinel_disruption_budget_in_use{"budget": "pool"}'] == 0


async def test_a_wave_larger_than_the_budget_fails_at_once(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
) -> None:
    cp = await control_plane_factory(autonomy_policy_path=_budget_file(tmp_path))
    await agent_factory("node-a", cp.port)
    await agent_factory("node-b", cp.port)
    wide = plan(step("set_telemetry_interval", ["node-a", "node-b"], {"seconds": 3}), parallel=2)
    wide.limits.deadline.FromTimedelta(dt.timedelta(seconds=60))
    async with plan_client(pki, cp.port) as stub:
        submitted = await stub.SubmitPlan(plan_pb2.SubmitPlanRequest(plan=wide))
        done = await wait_terminal(stub, submitted.plan.plan_id, timeout=10)
    assert done.phase == plan_pb2.PLAN_PHASE_FAILED
    assert "a wave of 2 node(s) can never fit disruption budget 'pool'" in done.status_message
    assert await _command_times(cp) == {}


async def test_a_cordoned_node_counts_and_the_wait_ends_at_the_deadline(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
) -> None:
    cp = await control_plane_factory(autonomy_policy_path=_budget_file(tmp_path))
    await agent_factory("node-a", cp.port)
    await agent_factory("node-b", cp.port)
    async with plan_client(pki, cp.port) as stub:
        cordon = await stub.SubmitPlan(
            plan_pb2.SubmitPlanRequest(plan=plan(step("cordon", ["node-b"])))
        )
        done = await wait_terminal(stub, cordon.plan.plan_id)
        assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message
        await eventually(lambda: "node-b" in cp.registry.cordoned())
        late = plan(step("set_telemetry_interval", ["node-a"], {"seconds": 3}))
        late.limits.deadline.FromTimedelta(dt.timedelta(seconds=2))
        submitted = await stub.SubmitPlan(plan_pb2.SubmitPlanRequest(plan=late))
        reasons = await asyncio.wait_for(_waiting_reasons(stub, submitted.plan.plan_id), 15)
        done = await wait_terminal(stub, submitted.plan.plan_id, timeout=10)
    assert reasons == [
        "waiting for disruption budget 'pool' (1 of 1 node(s) in use: node-b cordoned)"
    ]
    assert done.phase == plan_pb2.PLAN_PHASE_FAILED
    assert "deadline passed" in done.status_message
    assert done.waiting_reason == ""
    assert set(await _command_times(cp)) == {cordon.plan.plan_id}


async def test_holds_left_by_a_plan_that_ended_are_released_when_a_control_plane_starts(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
    database_url: str,
) -> None:
    budgets = _budget_file(tmp_path)
    first = await control_plane_factory(autonomy_policy_path=budgets)
    await first.stop()
    # As a controller killed mid-wave leaves it: a hold of a plan that is no longer running.
    now = dt.datetime.now(dt.UTC)

    def leak(db: Connection) -> None:
        db.execute(
            DISRUPTION_HOLDS.insert(),
            [{"budget": "pool", "node": "node/node-b", "plan_id": "gone", "step_index": 0,
              "acquired_at": now}],
        )  # fmt: skip

    store = Store(database_url)
    try:
        store.run_core_sync(leak)
    finally:
        store.close()
    cp = await control_plane_factory(autonomy_policy_path=budgets)
    await agent_factory("node-a", cp.port)
    async with plan_client(pki, cp.port) as stub:
        submitted = await stub.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(step("set_telemetry_interval", ["node-a"], {"seconds": 3}))
            )
        )
        done = await wait_terminal(stub, submitted.plan.plan_id, timeout=15)
    assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message
    assert await _holds(cp) == []


@needs_postgres
async def test_plans_submitted_to_two_control_planes_never_overlap(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
) -> None:
    budgets = _budget_file(tmp_path)
    a, b = [
        await control_plane_factory(
            controller_id=f"replica-{name}",
            autonomy_policy_path=budgets,
            telemetry_interval_s=TELEMETRY_S,
        )
        for name in "ab"
    ]
    await agent_factory("node-a", a.port)
    await agent_factory("node-b", b.port)
    await eventually(lambda: a.registry.count() == 2 and b.registry.count() == 2)
    await _run_contending_plans(pki, (a, b), a)


@needs_postgres
async def test_two_stores_racing_for_the_last_slot_never_both_get_it(database_url: str) -> None:
    """The decision is the database's: two control planes' stores (own engines and
    connections) asking at the same moment, many times over, never both win."""
    stores = [Store(database_url) for _ in range(2)]
    stores[0].migrate()
    budget = DisruptionBudget("pool", ("node-*",), max_nodes=1)
    agents = {"node-a": False, "node-b": False}
    books = [DisruptionBudgets(s, [budget], lambda: agents) for s in stores]
    try:
        for round_ in range(40):
            got = await asyncio.gather(
                books[0].acquire(f"x{round_}", 0, ["node/node-a"]),
                books[1].acquire(f"y{round_}", 0, ["node/node-b"]),
            )
            assert sum(refusal is None for refusal in got) == 1, (round_, got)
            await books[0].release(f"x{round_}")
            await books[1].release(f"y{round_}")
    finally:
        for s in stores:
            s.close()


def test_the_limit_is_the_smallest_given_and_a_percentage_is_at_least_one_node() -> None:
    assert DisruptionBudget("b", max_nodes=3).limit(100) == 3
    assert DisruptionBudget("b", max_percent=10).limit(100) == 10
    assert DisruptionBudget("b", max_percent=10).limit(19) == 1
    assert DisruptionBudget("b", max_percent=10).limit(0) == 1
    assert DisruptionBudget("b", max_nodes=3, max_percent=50).limit(4) == 2


def test_what_a_budget_covers() -> None:
    every = DisruptionBudget("all", max_nodes=1)
    gpus = DisruptionBudget("gpus", ("gpu-*",), max_nodes=1)
    cluster = DisruptionBudget("c", kubernetes_cluster="prod", max_nodes=1)
    assert every.covers("node/x") and not every.covers("k8s/prod/Node/x")
    assert gpus.covers("node/gpu-1") and not gpus.covers("node/cpu-1")
    assert cluster.covers("k8s/prod/Node/x") and not cluster.covers("k8s/dev/Node/x")
    assert not cluster.covers("node/x")


@pytest.mark.parametrize(
    ("items", "problem"),
    [
        ([{"name": "a"}], "set max_nodes, max_percent or both"),
        ([{"name": "a", "max_nodes": -1}], "max_nodes"),
        ([{"name": "a", "max_percent": 150}], "max_percent"),
        ([{"name": "a", "max_nodes": 1}, {"name": "a", "max_nodes": 1}], "used twice"),
        ([{"name": "a", "max_nodes": 1, "selector": "x"}], "unknown field(s) selector"),
        ({"name": "a"}, "must be a list"),
    ],
)
def test_bad_budgets_are_refused_with_the_field(items: object, problem: str) -> None:
    with pytest.raises(BudgetConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_budgets(items)
