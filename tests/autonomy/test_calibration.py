"""Planner calibration: each plan source's recent plans, rollbacks and prediction verdicts, over
the API, on /metrics, and as the `source` variable of policies."""

from __future__ import annotations

import datetime as dt
import pathlib

import grpc
import pytest
from sentinel.v1 import autonomy_pb2, autonomy_pb2_grpc, plan_pb2

from controlplane.autonomy import role_of
from controlplane.autonomy._calibration import CalibrationCache
from controlplane.plans import Phase, PlanRepository
from controlplane.policy import EvaluationContext, PolicyEngine, load_policy_files
from controlplane.store import Store
from tests.autonomy.seed import OPERATOR, seed_plan, verdicts
from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually
from tests.plan_helpers import plan, plan_client, step, write_policy
from tests.processes.test_processes import _metrics as scrape_metrics

pytestmark = pytest.mark.timeout(60)

GUARDRAILS = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "policies"

CALIBRATION_POLICY = """
policy_id: calibration
description: sources whose predictions often miss need an operator
rules:
  - rule_id: calibrated-source
    expression: source.predictions < 10 || source.prediction_hit_rate >= 0.9
    message: this source's predictions came true too rarely lately
    field: source
    effect: REQUIRE_APPROVAL
"""


def _stub(pki: Pki, port: int, role: str, name: str) -> tuple[grpc.aio.Channel, object]:
    channel = grpc.aio.secure_channel(f"localhost:{port}", pki.channel_credentials(role, name))
    return channel, autonomy_pb2_grpc.AutonomyServiceStub(channel)


async def test_calibration_counts_recent_plans_and_predictions_and_steers_policy(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
) -> None:
    cp = await control_plane_factory(
        policy_paths=write_policy(tmp_path / "calibration.yaml", CALIBRATION_POLICY),
        autonomy_interval_s=0.2,
    )
    await agent_factory("node-a", cp.port)
    repository = cp.plans.repository
    # inframind: 12 judged predictions, 9 held (75 %), one inconclusive; one plan rolled back.
    await seed_plan(repository, Phase.COMPLETED, predictions=verdicts(5, 1, 1, confidence=0.9))
    await seed_plan(repository, Phase.COMPLETED, predictions=verdicts(4, 2, confidence=0.6))
    await seed_plan(repository, Phase.ROLLED_BACK)
    # Not counted: a plan cancelled before it ran; another source's plans apart.
    await seed_plan(repository, Phase.CANCELLED, predictions=verdicts(0, 5))
    await seed_plan(
        repository, Phase.COMPLETED, source="tuner", submitted_by=OPERATOR, predictions=verdicts(3)
    )

    channel, stub = _stub(pki, cp.port, "viewer", "vera")
    async with channel:
        got = (
            await stub.GetPlannerCalibration(  # type: ignore[attr-defined]
                autonomy_pb2.GetPlannerCalibrationRequest(source="inframind")
            )
        ).calibration
        assert (got.plans, got.rollbacks, got.predictions, got.predictions_held) == (3, 1, 12, 9)
        assert got.hit_rate == pytest.approx(0.75)
        assert got.mean_confidence == pytest.approx((6 * 0.9 + 6 * 0.6) / 12)
        assert got.window.ToTimedelta() == dt.timedelta(hours=24)

        unknown = (
            await stub.GetPlannerCalibration(  # type: ignore[attr-defined]
                autonomy_pb2.GetPlannerCalibrationRequest(source="never-seen")
            )
        ).calibration
        assert (unknown.plans, unknown.predictions, unknown.hit_rate) == (0, 0, 1.0)

        status = await stub.GetAutonomyStatus(  # type: ignore[attr-defined]
            autonomy_pb2.GetAutonomyStatusRequest()
        )
        by_source = {c.source: c for c in status.calibration}
        assert set(by_source) == {"inframind", "tuner"}
        assert by_source["tuner"].hit_rate == 1.0 and by_source["tuner"].predictions == 3
        assert not status.breaker.tripped

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetPlannerCalibration(  # type: ignore[attr-defined]
                autonomy_pb2.GetPlannerCalibrationRequest()
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def gauges() -> dict[str, float]:
        return scrape_metrics(cp.metrics_port)

    metrics = await eventually(
        lambda: (
            (m := gauges()).get('sentinel_planner_prediction_hit_ratio{"source": "tuner"}')
            is not None
            and m.get('sentinel_planner_prediction_hit_ratio{"source": "inframind"}') == 0.75
            and m
        )
    )
    assert metrics['sentinel_planner_prediction_hit_ratio{"source": "inframind"}'] == 0.75
    assert metrics['sentinel_planner_recent_rollbacks{"source": "inframind"}'] == 1
    assert metrics['sentinel_planner_stated_confidence{"source": "inframind"}'] == pytest.approx(
        0.75
    )
    assert metrics['sentinel_planner_prediction_hit_ratio{"source": "tuner"}'] == 1.0

    # The policy on the source's hit rate sends its next plan to an operator; another source's
    # plan (no judged prediction) passes.
    async with plan_client(pki, cp.port) as planner:
        held = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(step("set_telemetry_interval", ["node-a"], {"seconds": 5}))
            )
        )
        assert held.plan.phase == plan_pb2.PLAN_PHASE_AWAITING_APPROVAL
        assert [v.rule_id for v in held.plan.violations] == ["calibrated-source"]
        other = plan(step("set_telemetry_interval", ["node-a"], {"seconds": 5}))
        other.source = "newcomer"
        passed = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(plan=other, validate_only=True)
        )
        assert passed.plan.phase == plan_pb2.PLAN_PHASE_APPROVED


async def test_calibration_is_read_from_the_store_by_every_replica(
    database_url: str, control_plane_factory: ControlPlaneFactory
) -> None:
    # Plans ended elsewhere (another replica, before a restart) are read from the store.
    cp = await control_plane_factory()
    await seed_plan(cp.plans.repository, Phase.COMPLETED, predictions=verdicts(1, 1))
    store = Store(database_url)
    try:
        cache = CalibrationCache(store, window_s=3600.0)
        await cache.refresh()
        got = cache.of("inframind")
        assert (got.plans, got.predictions, got.predictions_held) == (1, 2, 1)
        assert got.hit_rate == 0.5
        # A later refresh reads only what changed; a plan out of the window is forgotten.
        await seed_plan(cp.plans.repository, Phase.ROLLED_BACK)
        await cache.refresh()
        assert cache.of("inframind").rollbacks == 1
        await cache.refresh(now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=2))
        assert cache.of("inframind").plans == 0
        assert cache.of("inframind").hit_rate == 1.0
    finally:
        store.close()


async def test_a_failed_plan_counts_as_a_rollback_only_when_a_step_ran(
    control_plane_factory: ControlPlaneFactory,
) -> None:
    cp = await control_plane_factory()
    repository: PlanRepository = cp.plans.repository
    await seed_plan(repository, Phase.FAILED, ran=False)
    await seed_plan(repository, Phase.FAILED, ran=True)
    got = cp.autonomy.calibration.of("inframind")
    assert (got.plans, got.rollbacks) == (2, 1)


def test_the_shipped_guardrails_hold_poorly_calibrated_or_rolled_back_sources() -> None:
    engine = PolicyEngine()
    engine.replace_policies(load_policy_files(str(GUARDRAILS)))
    document = {
        "plan_id": "p",
        "source": "inframind",
        "confidence": 0.95,
        "steps": [],
        "node_ids": [],
        "targets": [],
    }

    def rules(**source: object) -> list[str]:
        context = EvaluationContext(
            now=dt.datetime(2026, 3, 4, 12, tzinfo=dt.UTC),
            fleet_size=10,
            connected_nodes=10,
            cordoned_nodes=frozenset(),
            recent_plans_by_target={},
            rate_window_s=3600.0,
            source=source,
        )
        return [v.rule_id for v in engine.evaluate(document, context).violations]

    assert rules() == []
    assert rules(predictions=9, prediction_hit_rate=0.5) == []  # too few to judge
    assert rules(predictions=10, prediction_hit_rate=0.8) == [
        "poorly-calibrated-source-needs-approval"
    ]
    assert rules(predictions=10, prediction_hit_rate=0.9) == []
    assert rules(recent_rollbacks=2) == ["rolled-back-source-needs-approval"]


def test_roles_come_from_the_spiffe_path() -> None:
    assert role_of("spiffe://sentinel.local/planner/inframind") == "planner"
    assert role_of("spiffe://sentinel.local/operator/alice") == "operator"
    assert role_of("user:alice") == ""
    assert role_of("pipeline-controller") == ""
