"""Predicted effects and outcomes, with a real control plane and agents on a fake NVIDIA
driver: a prediction that holds completes the plan, one that misses rolls it back (or is only
recorded), and the outcome shows the telemetry the agents sent before and after."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import grpc
import pytest
from sentinel.v1 import plan_pb2, plan_pb2_grpc

from controlplane.plans import (
    Aggregation,
    Prediction,
    PredictionChecker,
    PredictionResult,
    PredictionVerdict,
    TelemetryHistory,
)
from controlplane.telemetry import Sample
from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually
from tests.fakenvml import FakeNvml, h100
from tests.plan_helpers import TERMINAL, plan, plan_client, step, wait_terminal

pytestmark = pytest.mark.timeout(60)

UNCAPPED_MW = 312_456  # what each fake board draws before the plan
HEADROOM_MW = 20_000  # under a cap, a board draws this much below it


class CappedNvml(FakeNvml):
    """Boards under load: a power cap lowers what they draw (to just below the cap), lifting
    it lets them draw their load again; telemetry shows the effect of a plan's cap."""

    def nvmlDeviceSetPowerManagementLimit(self, handle: Any, milliwatts: int) -> None:
        super().nvmlDeviceSetPowerManagementLimit(handle, milliwatts)
        gpu = self._board(handle, "nvmlDeviceSetPowerManagementLimit")
        gpu.power_usage = min(UNCAPPED_MW, milliwatts - HEADROOM_MW)


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> CappedNvml:
    fake = CappedNvml([h100(0), h100(1)])
    fake.install(monkeypatch)
    return fake


def prediction(
    name: str,
    expression: str,
    *,
    metric: str = "gpu.power_watts",
    aggregation: plan_pb2.PredictionAggregation.ValueType = plan_pb2.PREDICTION_AGGREGATION_MEAN,
    window_s: float = 5.0,
    on_miss: plan_pb2.PredictionMissAction.ValueType = plan_pb2.PREDICTION_MISS_ACTION_ROLLBACK,
    confidence: float = 0.0,
) -> plan_pb2.Prediction:
    message = plan_pb2.Prediction(
        name=name,
        metric=metric,
        aggregation=aggregation,
        expression=expression,
        on_miss=on_miss,
        confidence=confidence,
    )
    message.window.FromTimedelta(dt.timedelta(seconds=window_s))
    return message


def cap_plan(watts: float, *predictions: plan_pb2.Prediction) -> plan_pb2.Plan:
    message = plan(step("set_gpu_power_limit", ["gpu-a"], {"watts": watts}))
    message.predictions.extend(predictions)
    return message


async def _run(
    stub: plan_pb2_grpc.PlanServiceStub, message: plan_pb2.Plan
) -> tuple[plan_pb2.Plan, plan_pb2.PlanOutcome]:
    """Submits the plan, follows it with WatchPlan to its end; the plan and the outcome the
    final message carried."""
    submitted = await stub.SubmitPlan(plan_pb2.SubmitPlanRequest(plan=message))
    assert submitted.plan.phase == plan_pb2.PLAN_PHASE_APPROVED, submitted.plan.violations
    last = None
    async with asyncio.timeout(30):
        async for last in stub.WatchPlan(plan_pb2.WatchPlanRequest(plan_id=submitted.plan.plan_id)):
            if last.plan.phase in TERMINAL:
                break
    assert last is not None and last.plan.phase in TERMINAL
    assert last.HasField("outcome"), "the final WatchPlan message carries the outcome"
    return last.plan, last.outcome


async def test_prediction_that_holds_completes_the_plan_with_the_measured_value(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    nvml: CappedNvml,
) -> None:
    cp = await control_plane_factory()
    await agent_factory("gpu-a", cp.port)
    async with plan_client(pki, cp.port) as planner:
        done, outcome = await _run(
            planner,
            cap_plan(
                250,
                prediction("power-down", "value <= 240.0", confidence=0.8),
                prediction(
                    "hottest-stays-cool",
                    "value < 80.0",
                    metric="gpu.temperature_celsius",
                    aggregation=plan_pb2.PREDICTION_AGGREGATION_MAX,
                ),
            ),
        )

    assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message
    results = {r.name: r for r in done.prediction_results}
    power = results["power-down"]
    assert power.verdict == plan_pb2.PREDICTION_VERDICT_HELD, power.message
    # Each board draws 20 W under its 250 W cap: what the agent reported, per GPU.
    assert power.observed == 230.0
    assert power.samples == 1
    assert power.confidence == pytest.approx(0.8)
    assert 0 < power.time_to_effect.ToTimedelta().total_seconds() < 5.0
    assert "held: value 230 (mean gpu.power_watts)" in power.message
    hottest = results["hottest-stays-cool"]
    assert hottest.verdict == plan_pb2.PREDICTION_VERDICT_HELD
    assert hottest.observed == 41.0
    assert hottest.confidence == pytest.approx(0.95)  # the plan's, as none was stated
    # The outcome: every prediction held, so the plan's time to effect is the longest.
    assert [p.name for p in outcome.predictions] == ["power-down", "hottest-stays-cool"]
    assert outcome.time_to_effect.ToTimedelta() == max(
        p.time_to_effect.ToTimedelta() for p in outcome.predictions
    )
    held = cp.metrics.registry.get_sample_value(
        "sentinel_plan_predictions_total", {"source": "inframind", "verdict": "held"}
    )
    assert held == 2.0


async def test_missed_prediction_rolls_the_plan_back_with_the_measured_value(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    nvml: CappedNvml,
) -> None:
    cp = await control_plane_factory()
    await agent_factory("gpu-a", cp.port)
    async with plan_client(pki, cp.port) as planner:
        done, outcome = await _run(
            planner, cap_plan(250, prediction("power-down", "value <= 100.0", window_s=2.0))
        )

    assert done.phase == plan_pb2.PLAN_PHASE_ROLLED_BACK, done.status_message
    [result] = done.prediction_results
    assert result.verdict == plan_pb2.PREDICTION_VERDICT_MISSED
    assert result.observed == 230.0
    assert not result.HasField("time_to_effect")
    assert result.samples == 1
    expected = (
        "prediction 'power-down' missed: value 230 (mean gpu.power_watts), "
        "expected value <= 100.0, within 2 s"
    )
    assert result.message == expected
    assert expected in done.status_message
    # Rolled back: the step is undone, the boards have their 700 W limit (and load) again.
    assert done.steps[0].state == plan_pb2.STEP_STATE_ROLLED_BACK
    assert [g.power_limit for g in nvml.gpus] == [700_000, 700_000]
    assert [g.power_usage for g in nvml.gpus] == [UNCAPPED_MW, UNCAPPED_MW]
    assert outcome.phase == plan_pb2.PLAN_PHASE_ROLLED_BACK
    assert not outcome.HasField("time_to_effect")
    missed = cp.metrics.registry.get_sample_value(
        "sentinel_plan_predictions_total", {"source": "inframind", "verdict": "missed"}
    )
    assert missed == 1.0


async def test_missed_prediction_that_only_records_lets_the_plan_complete(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    nvml: CappedNvml,
) -> None:
    cp = await control_plane_factory()
    await agent_factory("gpu-a", cp.port)
    async with plan_client(pki, cp.port) as planner:
        done, _ = await _run(
            planner,
            cap_plan(
                300,
                prediction(
                    "deep-cut",
                    "value <= 100.0",
                    aggregation=plan_pb2.PREDICTION_AGGREGATION_P95,
                    window_s=2.0,
                    on_miss=plan_pb2.PREDICTION_MISS_ACTION_RECORD,
                ),
            ),
        )
        stored = (await planner.GetPlan(plan_pb2.GetPlanRequest(plan_id=done.plan_id))).plan

    assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message
    [result] = stored.prediction_results
    assert result.verdict == plan_pb2.PREDICTION_VERDICT_MISSED
    assert result.observed == 280.0
    assert "prediction 'deep-cut' missed: value 280 (p95 gpu.power_watts)" in done.status_message
    assert [g.power_limit for g in nvml.gpus] == [300_000, 300_000]  # kept: only recorded


async def test_outcome_shows_telemetry_before_and_after_from_what_the_agents_sent(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    nvml: CappedNvml,
) -> None:
    cp = await control_plane_factory()
    await agent_factory("gpu-a", cp.port)
    await asyncio.sleep(1.0)  # some history of the uncapped boards
    async with plan_client(pki, cp.port) as planner:
        done, watched = await _run(
            planner,
            # Never true: the plan is checked (and its after window open) for 2 s.
            cap_plan(
                250,
                prediction(
                    "window",
                    "value < 0.0",
                    window_s=2.0,
                    on_miss=plan_pb2.PREDICTION_MISS_ACTION_RECORD,
                ),
            ),
        )
        outcome = (
            await planner.GetPlanOutcome(plan_pb2.GetPlanOutcomeRequest(plan_id=done.plan_id))
        ).outcome
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await planner.GetPlanOutcome(plan_pb2.GetPlanOutcomeRequest(plan_id="plan-nope"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await planner.GetPlanOutcome(plan_pb2.GetPlanOutcomeRequest())
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message
    assert outcome == watched
    assert outcome.plan_id == done.plan_id and outcome.phase == plan_pb2.PLAN_PHASE_COMPLETED
    assert outcome.start_time.ToDatetime() <= outcome.end_time.ToDatetime()
    [target] = outcome.targets
    assert target.target == "node/gpu-a"
    changes = {c.metric: c for c in target.metrics}
    assert list(changes) == [
        "gpu.power_watts",
        "gpu.utilization_percent",
        "gpu.temperature_celsius",
        "gpu.memory_used_percent",
    ]
    power = changes["gpu.power_watts"]
    # Before: both boards at 312.456 W in every sample that arrived in the minute before.
    before = power.before
    assert (before.mean, before.p95, before.min, before.max) == (312.456,) * 4
    assert before.count >= 2 and before.count % 2 == 0  # samples times 2 GPUs
    assert before.end_time == outcome.start_time
    # After: the boards at 230 W under their 250 W cap, in every sample since the last step
    # (at 0.2 s for 2 s). A sample taken just before the cap may still arrive after the step:
    # at most one such sample, at the uncapped draw.
    after = power.after
    assert after.count >= 10 and after.count % 2 == 0
    assert after.min == 230.0
    assert after.max in (230.0, 312.456)
    uncapped_values = round((after.mean - 230.0) * after.count / (312.456 - 230.0))
    assert uncapped_values in (0, 2)
    assert after.mean == pytest.approx(
        (230.0 * (after.count - uncapped_values) + 312.456 * uncapped_values) / after.count,
        abs=0.001,
    )
    assert after.start_time == outcome.end_time
    temperature = changes["gpu.temperature_celsius"]
    assert temperature.before.mean == temperature.after.mean == 41.0
    utilization = changes["gpu.utilization_percent"]
    assert utilization.before.max == utilization.after.max == 87.0


async def test_restarted_controller_keeps_decided_verdicts_and_judges_the_rest(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    nvml: CappedNvml,
) -> None:
    first = await control_plane_factory()
    port = first.port
    await agent_factory("gpu-a", port)
    async with plan_client(pki, port) as planner:
        submitted = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=cap_plan(
                    250,
                    prediction("power-down", "value <= 240.0"),
                    prediction(
                        "never",
                        "value < 0.0",
                        window_s=4.0,
                        on_miss=plan_pb2.PREDICTION_MISS_ACTION_RECORD,
                    ),
                )
            )
        )
        plan_id = submitted.plan.plan_id

        async def one_verdict_stored() -> list[plan_pb2.PredictionResult]:
            got = (await planner.GetPlan(plan_pb2.GetPlanRequest(plan_id=plan_id))).plan
            return list(got.prediction_results)

        [held] = await eventually(one_verdict_stored, timeout=10)
    assert held.name == "power-down" and held.verdict == plan_pb2.PREDICTION_VERDICT_HELD
    await first.stop()  # while "never" is still being checked

    second = await control_plane_factory(listen=f"127.0.0.1:{port}")
    async with plan_client(pki, second.port) as planner:
        done = await wait_terminal(planner, plan_id, timeout=20)
        outcome = (
            await planner.GetPlanOutcome(plan_pb2.GetPlanOutcomeRequest(plan_id=plan_id))
        ).outcome
    assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message
    kept, never = done.prediction_results
    assert kept == held  # decided before the restart: not judged again
    assert never.name == "never" and never.verdict == plan_pb2.PREDICTION_VERDICT_MISSED
    # Judged when what was left of its 4 s window passed, counted from the end of the last
    # step (not 4 s from the restart).
    judged = never.check_time.ToDatetime() - outcome.end_time.ToDatetime()
    assert 4.0 <= judged.total_seconds() < 4.8
    assert never.observed == 230.0


async def test_invalid_predictions_are_refused_with_their_field_paths(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    nvml: CappedNvml,
) -> None:
    cp = await control_plane_factory()
    await agent_factory("gpu-a", cp.port)
    bad = cap_plan(
        250,
        prediction("power", "value <= 460.0"),
        prediction("power", "value <= 460.0"),
        prediction("watts", "value <= 460.0", metric="gpu.wattage"),
        prediction("sample", "sample.seq > 0"),
        prediction("no-window", "value <= 460.0", window_s=0.0),
        prediction("too-long", "value <= 460.0", window_s=25 * 3600),
        prediction("unsure", "value <= 460.0", confidence=1.5),
        prediction("no-metric", "value <= 460.0", metric=""),
        prediction("", "value <= 460.0"),
        prediction("broken", "value <="),
    )
    async with plan_client(pki, cp.port) as planner:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await planner.SubmitPlan(plan_pb2.SubmitPlanRequest(plan=bad))
        fine = cap_plan(
            250, prediction("cpu", "value < 100.0 && size(samples) == 1", metric="host.cpu_percent")
        )
        accepted = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(plan=fine, validate_only=True)
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details() or ""
    for expected in (
        "plan.predictions[1].name: duplicate of predictions[0]",
        "plan.predictions[2].metric: unknown metric 'gpu.wattage'; known: gpu.memory_used_percent",
        "plan.predictions[3].expression: unknown variable(s) sample; predictions may use samples, "
        "value",
        "plan.predictions[4].window: must be within (0, 86400] seconds",
        "plan.predictions[5].window: must be within (0, 86400] seconds",
        "plan.predictions[6].confidence: must be within [0, 1], got 1.5",
        "plan.predictions[7].expression: uses `value`, but the prediction names no metric",
        "plan.predictions[8].name: required",
        "plan.predictions[9].expression: ",
    ):
        assert expected in details, details
    assert "host.cpu_percent" in details and "gpu.power_watts" in details  # the known ones
    assert accepted.plan.phase == plan_pb2.PLAN_PHASE_APPROVED


# --- the domain without a server ---------------------------------------------------------------


class _Gpu:
    def __init__(self, watts: float) -> None:
        self.power_usage_milliwatts = int(watts * 1000)
        self.power_limit_milliwatts = 700_000
        self.utilization_gpu_percent = 50
        self.temperature_celsius = 40
        self.memory_used_bytes = 1
        self.memory_total_bytes = 4
        self.unsupported: list[str] = []


class _Payload:
    def __init__(self, *watts: float) -> None:
        self.gpus = [_Gpu(w) for w in watts]


async def test_checker_judges_only_fresh_samples_and_is_inconclusive_without_them() -> None:
    latest: dict[str, Sample[Any]] = {"a": Sample("a", 1, _Payload(500.0, 500.0))}
    checker = PredictionChecker(latest.get, lambda payload: {}, poll_interval_s=0.01)
    verdicts: list[PredictionResult] = []

    async def keep(result: PredictionResult) -> None:
        verdicts.append(result)

    predictions = [
        Prediction("down", "gpu.power_watts", Aggregation.MAX, "value <= 400.0", window_s=1.0),
    ]
    now = dt.datetime.now(dt.UTC)
    # Only the sample that was there before: no judgement, inconclusive.
    await checker.verify(predictions, ["a"], finished_at=now, plan_confidence=0.5, decided=keep)
    assert verdicts[0].verdict == PredictionVerdict.INCONCLUSIVE
    assert "no fresh telemetry from a" in verdicts[0].message

    async def fresh_sample_later() -> None:
        await asyncio.sleep(0.1)
        latest["a"] = Sample("a", 2, _Payload(300.0, 350.0))

    feeder = asyncio.create_task(fresh_sample_later())
    await checker.verify(
        predictions, ["a"], finished_at=dt.datetime.now(dt.UTC), plan_confidence=0.5, decided=keep
    )
    await feeder
    assert verdicts[1].verdict == PredictionVerdict.HELD
    assert verdicts[1].observed == 350.0
    assert verdicts[1].confidence == 0.5


def test_history_thins_idle_nodes_and_keeps_every_sample_of_watched_ones() -> None:
    now = [1_000.0]
    history = TelemetryHistory(window_s=10.0, max_samples=5, clock=lambda: now[0])
    for seq in range(1, 21):  # one sample per 0.5 s for 10 s
        history.record([Sample("a", seq, _Payload(100.0 + seq))])
        now[0] += 0.5
    end = dt.datetime.fromtimestamp(now[0], dt.UTC)
    start = end - dt.timedelta(seconds=10)
    thinned = history.summaries("a", start, end)["gpu.power_watts"]
    assert thinned.count == 5  # one every 2 s
    history.watch(["a"])
    for seq in range(21, 31):
        history.record([Sample("a", seq, _Payload(200.0))])
        now[0] += 0.5
    after = history.summaries("a", end, dt.datetime.fromtimestamp(now[0], dt.UTC))[
        "gpu.power_watts"
    ]
    assert (after.count, after.mean, after.min, after.max) == (10, 200.0, 200.0, 200.0)
    history.unwatch(["a"])
