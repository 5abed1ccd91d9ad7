"""The plan desk and the pipeline controller against the `Executor` protocol alone, without a
gRPC server or agents: a real store (SQLite or PostgreSQL), the real desk, lease, controller and
validation, and an executor written here for Kubernetes targets. It stands in for the Kubernetes
executor to come and shows that a new kind of target plugs in without touching the controller:
validation, preview, waves, rollback in reverse order and cancellation all go through the
protocol. (Nothing is mocked: the executor below is a complete, if in-memory, executor.)"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from controlplane.executors import (
    DryRun,
    Executors,
    FieldChange,
    KubernetesObject,
    Problems,
    RunOutcome,
    StepRun,
    Target,
    TargetKind,
    Undo,
)
from controlplane.plans import (
    Phase,
    PlanInvalid,
    StepState,
)
from tests.plan_rig import PlanRig, draft_plan, plan_rig


@dataclass
class Deployments:
    """The replica counts of a pretend cluster, the state the test executor changes."""

    replicas: dict[str, int] = field(default_factory=dict)
    runs: list[tuple[str, str, Mapping[str, Any], bool]] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)
    hold: asyncio.Event | None = None
    withdrawn: list[str] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    withdrawal: asyncio.Event = field(default_factory=asyncio.Event)


class ReplicaExecutor:
    """Scales objects of a pretend cluster: a complete executor for `kubernetes` targets."""

    kind = TargetKind.KUBERNETES
    actions = frozenset({"scale"})

    def __init__(self, cluster: Deployments) -> None:
        self.cluster = cluster
        self._started: dict[tuple[str, int, str, bool], RunOutcome] = {}

    def check_parameters(self, action: str, parameters: Mapping[str, Any]) -> Problems:
        replicas = parameters.get("replicas")
        if not isinstance(replicas, int | float) or replicas < 0 or int(replicas) != replicas:
            return [("replicas", "a whole number of replicas >= 0")]
        return []

    def check_target(self, action: str, target: Target) -> Problems:
        assert target.kubernetes is not None
        if target.kubernetes.cluster != "lab":
            return [("kubernetes.cluster", f"unknown cluster {target.kubernetes.cluster!r}")]
        return []

    def preview(self, action: str, parameters: Mapping[str, Any], target: Target) -> str:
        return f"scale {target.key} to {parameters['replicas']:g}"

    async def run(self, run: StepRun) -> RunOutcome:
        key = (run.plan_id, run.step_index, run.target.key, run.undo)
        if key in self._started:  # the same run again attaches to it
            return self._started[key]
        name = run.target.key
        self.cluster.runs.append((name, run.action, dict(run.parameters), run.undo))
        self.cluster.started.set()
        if self.cluster.hold is not None and not run.undo:
            await self.cluster.hold.wait()
        if name in self.cluster.refuse and not run.undo:
            outcome = RunOutcome(False, "FAILED", f"{name} refused")
        else:
            previous = self.cluster.replicas.get(name, 1)
            self.cluster.replicas[name] = int(run.parameters["replicas"])
            outcome = RunOutcome(True, "SUCCEEDED", output={"previous": previous}, reference=name)
        self._started[key] = outcome
        return outcome

    async def placement(self, target: Target, deadline: dt.datetime) -> list[str]:
        return []

    async def observe(
        self, action: str, parameters: Mapping[str, Any], target: Target
    ) -> dict[str, str]:
        return {"replicas": str(self.cluster.replicas.get(target.key, 1))}

    async def dry_run(self, run: StepRun) -> DryRun:
        before = self.cluster.replicas.get(run.target.key, 1)
        after = int(run.parameters["replicas"])
        changes = () if before == after else (FieldChange("replicas", str(before), str(after)),)
        return DryRun(changes)

    async def withdraw(self, run: StepRun) -> bool:
        self.cluster.withdrawn.append(run.target.key)
        self.cluster.withdrawal.set()
        return True

    def undo(
        self, action: str, parameters: Mapping[str, Any], output: Mapping[str, Any]
    ) -> Undo | None:
        return Undo("scale", {"replicas": output["previous"]}) if "previous" in output else None


def _target(name: str, cluster: str = "lab") -> Target:
    return Target(kubernetes=KubernetesObject(cluster, "models", "Deployment", name))


@dataclass
class Rig(PlanRig):
    """The desk and controller, and the pretend cluster the test executor changes."""

    cluster: Deployments


@pytest.fixture
async def rig(database_url: str) -> AsyncIterator[Rig]:
    cluster = Deployments(replicas={"k8s/lab/models/Deployment/llm": 2})
    async with plan_rig(database_url, Executors([ReplicaExecutor(cluster)])) as running:
        yield Rig(running.desk, running.controller, cluster)


async def test_a_new_target_kind_is_validated_previewed_and_run_through_its_executor(
    rig: Rig,
) -> None:
    llm, embed = _target("llm"), _target("embed")
    submitted = await rig.desk.submit(
        draft_plan(("scale", [llm, embed], {"replicas": 4})), "planner", validate_only=False
    )
    assert [(c.node_id, c.wave, c.summary) for c in submitted.preview] == [
        (llm.key, 0, f"scale {llm.key} to 4"),
        (embed.key, 1, f"scale {embed.key} to 4"),
    ]
    plan = await rig.terminal(submitted.plan.plan_id)
    assert plan.phase == Phase.COMPLETED
    assert rig.cluster.replicas == {llm.key: 4, embed.key: 4}
    # One wave at a time, each target once, results filed under the target's key.
    assert [(name, undo) for name, _, _, undo in rig.cluster.runs] == [
        (llm.key, False),
        (embed.key, False),
    ]
    assert [(r.node_id, r.state, r.command_id) for r in plan.steps[0].node_results] == [
        (llm.key, StepState.SUCCEEDED, llm.key),
        (embed.key, StepState.SUCCEEDED, embed.key),
    ]
    assert plan.steps[0].message == "done on 2 target(s)"


async def test_the_executor_judges_its_targets_and_parameters_at_submission(rig: Rig) -> None:
    bad = draft_plan(
        ("scale", [_target("llm", cluster="elsewhere")], {"replicas": -1}),
        ("reboot", [_target("llm")], {}),
        ("set_gpu_power_limit", [Target(node_id="node-1")], {"watts": 300}),
        ("scale", [_target("llm"), Target(node_id="node-1")], {"replicas": 1}),
    )
    with pytest.raises(PlanInvalid) as refused:
        await rig.desk.submit(bad, "planner", validate_only=False)
    assert refused.value.problems == [
        ("plan.steps[0].targets[0].kubernetes.cluster", "unknown cluster 'elsewhere'"),
        ("plan.steps[0].parameters.replicas", "a whole number of replicas >= 0"),
        (
            "plan.steps[1].action",
            "unknown action 'reboot' for kubernetes targets; supported: scale",
        ),
        (
            "plan.steps[2].action",
            "'set_gpu_power_limit' on node targets: this control plane has no executor for them",
        ),
        (
            "plan.steps[3].targets",
            "all targets of a step must be of one kind (nodes or objects)",
        ),
    ]
    assert rig.cluster.runs == []


async def test_a_failed_run_rolls_back_what_succeeded_in_reverse_through_undo(rig: Rig) -> None:
    llm, embed, asr = _target("llm"), _target("embed"), _target("asr")
    rig.cluster.refuse.add(asr.key)
    submitted = await rig.desk.submit(
        draft_plan(("scale", [llm, embed], {"replicas": 6}), ("scale", [asr], {"replicas": 3})),
        "planner",
        validate_only=False,
    )
    plan = await rig.terminal(submitted.plan.plan_id)
    assert plan.phase == Phase.ROLLED_BACK
    assert f"{asr.key}: FAILED {asr.key} refused" in plan.status_message
    # Back to what each target had before the plan, undone last-first.
    assert rig.cluster.replicas == {llm.key: 2, embed.key: 1}
    assert [(name, params, undo) for name, _, params, undo in rig.cluster.runs] == [
        (llm.key, {"replicas": 6}, False),
        (embed.key, {"replicas": 6}, False),
        (asr.key, {"replicas": 3}, False),
        (embed.key, {"replicas": 1}, True),
        (llm.key, {"replicas": 2}, True),
    ]
    assert [r.rollback_outcome for r in plan.steps[0].node_results] == ["SUCCEEDED"] * 2
    assert [r.state for r in plan.steps[0].node_results] == [StepState.ROLLED_BACK] * 2


async def test_cancel_withdraws_runs_in_flight_and_rolls_back(rig: Rig) -> None:
    llm = _target("llm")
    rig.cluster.hold = asyncio.Event()
    submitted = await rig.desk.submit(
        draft_plan(("scale", [llm], {"replicas": 8})), "planner", validate_only=False
    )
    plan_id = submitted.plan.plan_id

    await asyncio.wait_for(rig.cluster.started.wait(), 10)
    await rig.desk.cancel(plan_id, "operator", "wrong model")

    await asyncio.wait_for(rig.cluster.withdrawal.wait(), 10)
    assert rig.cluster.withdrawn == [llm.key]
    rig.cluster.hold.set()  # the run had already started: its result is awaited, then undone
    plan = await rig.terminal(plan_id)
    assert plan.phase == Phase.ROLLED_BACK
    assert rig.cluster.replicas == {llm.key: 2}
    assert "wrong model" in plan.status_message
