"""A control plane killed (SIGKILL) in the middle of a canary rollout, and started again on the
same database, finishes the rollout from the cluster's state and the change record it left on
the Deployment: the plan completes once, the canary is created once and removed, and the undo
record still names the version from before the first attempt.

The control plane runs as a real process (`python -m controlplane.main`); the Kubernetes API
test server runs in this process, so the cluster outlives the control plane, as a real one
would."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import pytest
from google.protobuf import json_format, struct_pb2
from sentinel.v1 import plan_pb2

from tests.conftest import Pki
from tests.executors.conftest import NAMESPACE
from tests.fleet.test_restart_delivery import _free_port, _wait_listening
from tests.kubeapi import Cluster, KubeApiServer, RequestRecord, write_kubeconfig
from tests.kubeapi.objects import deployment
from tests.plan_helpers import phases, plan, plan_client, wait_terminal

STABLE = "llm"
CANARY = f"{STABLE}-canary"
OLD_IMAGE = "repo/llm:1"
NEW_IMAGE = "repo/llm:2"
REPLICAS = 4
WEIGHTS = [25, 50, 75, 100]
STEP_TIMEOUT_S = 60.0


class _TimedCluster(Cluster):
    """A cluster that also notes when it answered each API request (monotonic clock), and keeps
    enough change history to replay every Deployment state of a whole rollout."""

    def __init__(self) -> None:
        super().__init__(event_history=200_000)
        self._answered_at: list[float] = []

    def record(self, request: RequestRecord) -> None:
        with self.store.lock:
            super().record(request)
            self._answered_at.append(time.monotonic())

    def clear_requests(self) -> None:
        with self.store.lock:
            super().clear_requests()
            self._answered_at.clear()

    def timed_requests(self) -> list[tuple[float, RequestRecord]]:
        with self.store.lock:
            return list(zip(self._answered_at, self.requests, strict=True))

    def deployment_history(self) -> list[_DeploymentChange]:
        """Every stored change of a Deployment in the test namespace, oldest first."""
        with self.store.lock:
            changes = self.store.changes_after(0)
        assert changes is not None, "the change history no longer reaches the start"
        return [
            _DeploymentChange(
                c.resource_version,
                c.type,
                c.object["metadata"]["name"],
                None if c.type == "DELETED" else c.object,
            )
            for c in changes
            if c.kind == "Deployment" and c.namespace == NAMESPACE
        ]


@dataclass(frozen=True)
class _DeploymentChange:
    resource_version: int
    type: str  # ADDED, MODIFIED, DELETED
    name: str
    object: dict[str, Any] | None  # None once deleted


@pytest.fixture
def lab() -> Iterator[KubeApiServer]:
    """Cluster `lab`, in this process: three schedulable nodes, the `models` namespace and a
    Deployment of four ready replicas of the old version."""
    with KubeApiServer(_TimedCluster(), tick_seconds=0.05) as server:
        for index in range(3):
            server.cluster.add_node(f"gpu-{index}")
        server.cluster.put(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        )
        server.cluster.put(
            deployment(STABLE, namespace=NAMESPACE, replicas=REPLICAS, image=OLD_IMAGE)
        )
        server.cluster.wait_for(lambda: _available(server.cluster, STABLE) == REPLICAS)
        server.cluster.clear_requests()
        yield server


def _timed(kube: KubeApiServer) -> _TimedCluster:
    assert isinstance(kube.cluster, _TimedCluster)
    return kube.cluster


def _start_control_plane(
    pki: Pki, port: int, database_url: str, kubeconfig: pathlib.Path, log: IO[bytes]
) -> subprocess.Popen[bytes]:
    """`python -m controlplane.main` with the default reconcile interval and controller lease
    (what a user runs), on loopback, with cluster `lab` configured; its log goes to `log` (in
    the test's tmp_path, for a failure's post-mortem)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controlplane.main",
            "--certs-dir",
            str(pki.directory),
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-listen",
            "",
            "--enrollment-listen",
            "127.0.0.1:0",
            "--database-url",
            database_url,
            "--kubernetes-clusters",
            f"lab={kubeconfig}#lab",
        ],
        stdout=subprocess.PIPE,
        stderr=log,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _canary_step() -> plan_pb2.PlanStep:
    step = plan_pb2.PlanStep(step_id="canary", action="rollout")
    step.targets.add().kubernetes.CopyFrom(
        plan_pb2.KubernetesObject(
            cluster="lab", namespace=NAMESPACE, kind="Deployment", name=STABLE
        )
    )
    parameters = struct_pb2.Struct()
    parameters.update(
        {"container": "main", "image": NEW_IMAGE, "strategy": "canary", "weights": WEIGHTS}
    )
    step.parameters.CopyFrom(parameters)
    step.timeout.FromTimedelta(dt.timedelta(seconds=STEP_TIMEOUT_S))
    return step


def _image(obj: dict[str, Any]) -> str:
    return str(obj["spec"]["template"]["spec"]["containers"][0]["image"])


def _available(cluster: Cluster, name: str) -> int:
    found = cluster.get("Deployment", NAMESPACE, name)
    return int((found or {}).get("status", {}).get("availableReplicas", 0))


def _at_half(cluster: Cluster) -> bool:
    """The 50% stage in place: the canary serves two replicas and the stable one has shrunk to
    two (or less, a later stage), still on the old version."""
    canary = cluster.get("Deployment", NAMESPACE, CANARY)
    stable = cluster.require("Deployment", NAMESPACE, STABLE)
    return (
        canary is not None
        and _available(cluster, CANARY) >= 2
        and stable["spec"]["replicas"] <= 2
        and _image(stable) == OLD_IMAGE
    )


def _promoting(cluster: Cluster) -> bool:
    """The promotion: the stable Deployment has just taken the new version."""
    return _image(cluster.require("Deployment", NAMESPACE, STABLE)) == NEW_IMAGE


@dataclass(frozen=True)
class _Kill:
    at: float  # monotonic
    resource_version: int  # the cluster's at that moment


def _kill_when(
    cluster: Cluster, moment: Callable[[Cluster], bool], pid: int, timeout: float
) -> _Kill:
    """Blocks (in a worker thread) until `moment` holds, then SIGKILLs `pid` at once: the
    check runs under the cluster's lock, so the kill lands before the server answers anything
    else (a request already sent may still be applied, as with a real API server)."""

    def check() -> _Kill | None:
        if not moment(cluster):
            return None
        os.kill(pid, signal.SIGKILL)
        return _Kill(time.monotonic(), cluster.resource_version)

    return cluster.wait_for(check, timeout)


@dataclass(frozen=True)
class _Replicas:
    """What the Deployments' change history shows after the kill."""

    canary: list[int]  # the canary's spec.replicas, each time it changed
    stable: list[int]  # the stable one's
    least_asked: int  # the least canary + stable spec.replicas at any moment
    least_available: int  # the least canary + stable availableReplicas at any moment


def _replica_history(cluster: _TimedCluster, after_version: int) -> _Replicas:
    spec = {STABLE: REPLICAS, CANARY: 0}
    available = {STABLE: REPLICAS, CANARY: 0}
    canary_steps: list[int] = []
    stable_steps: list[int] = []
    least_asked, least_available = REPLICAS * 2, REPLICAS * 2
    for change in cluster.deployment_history():
        version, name, obj = change.resource_version, change.name, change.object
        if name not in spec:
            continue
        spec[name] = 0 if obj is None else int(obj["spec"]["replicas"])
        available[name] = (
            0 if obj is None else int(obj.get("status", {}).get("availableReplicas", 0))
        )
        if version <= after_version:
            continue
        steps = canary_steps if name == CANARY else stable_steps
        if not steps or steps[-1] != spec[name]:
            steps.append(spec[name])
        least_asked = min(least_asked, sum(spec.values()))
        least_available = min(least_available, sum(available.values()))
    return _Replicas(canary_steps, stable_steps, least_asked, least_available)


@dataclass(frozen=True)
class _Restart:
    """What a user could see of one kill and restart: the plan as it ended, the cluster's
    request log with times, and the moments of the kill and the restart."""

    plan_id: str
    done: plan_pb2.Plan
    kill: _Kill
    killed_with: dict[str, int]  # spec.replicas of each Deployment just after the kill
    restarted_at: float  # monotonic, when the second process was started
    listening_at: float
    ended_at: float
    requests: list[tuple[float, RequestRecord]]


async def _kill_mid_canary_and_restart(
    pki: Pki,
    database_url: str,
    lab: KubeApiServer,
    tmp_path: pathlib.Path,
    moment: Callable[[Cluster], bool],
) -> _Restart:
    """Submits the canary to a control plane process, SIGKILLs it at `moment`, starts another on
    the same database and follows the plan to its end (and the cluster to rest)."""
    cluster = _timed(lab)
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", {"lab": lab.url})
    port = _free_port()
    processes: list[subprocess.Popen[bytes]] = []
    logs = [(tmp_path / f"control-plane-{n}.log").open("wb") for n in (1, 2)]
    try:
        processes.append(_start_control_plane(pki, port, database_url, kubeconfig, logs[0]))
        await _wait_listening(processes[0])
        async with plan_client(pki, port) as planner:
            submitted = await planner.SubmitPlan(
                plan_pb2.SubmitPlanRequest(plan=plan(_canary_step()), request_id="canary-kill")
            )
        plan_id = submitted.plan.plan_id
        assert submitted.plan.phase == plan_pb2.PLAN_PHASE_APPROVED, submitted.plan.status_message
        kill = await asyncio.to_thread(_kill_when, cluster, moment, processes[0].pid, 30)
        await asyncio.to_thread(processes[0].wait, 10)
        killed_with = {
            name: int(cluster.require("Deployment", NAMESPACE, name)["spec"]["replicas"])
            for name in (STABLE, CANARY)
        }

        restarted_at = time.monotonic()
        processes.append(_start_control_plane(pki, port, database_url, kubeconfig, logs[1]))
        await _wait_listening(processes[1])
        listening_at = time.monotonic()
        async with plan_client(pki, port) as planner:
            # The killed process's controller lease (controller_lease_s, 10 s) expires first.
            done = await wait_terminal(planner, plan_id, timeout=60)
        ended_at = time.monotonic()
        await asyncio.to_thread(
            cluster.wait_for,
            lambda: (
                not cluster.list("Pod", NAMESPACE, label_selector="sentinel.io/track=canary")
                and _available(cluster, STABLE) == REPLICAS
            ),
            20,
        )
    finally:
        for process in processes:
            await asyncio.to_thread(_stop, process)
        for log in logs:
            log.close()
    restart = _Restart(
        plan_id,
        done,
        kill,
        killed_with,
        restarted_at,
        listening_at,
        ended_at,
        cluster.timed_requests(),
    )
    _report(restart, _replica_history(cluster, kill.resource_version))
    return restart


def _first_after_restart(
    restart: _Restart, resource_prefix: str = ""
) -> tuple[float, RequestRecord]:
    """The first API request answered after the restart (on resources starting with
    `resource_prefix`), with its delay after the restart."""
    for at, request in restart.requests:
        if at >= restart.restarted_at and (request.resource or "").startswith(resource_prefix):
            return at - restart.restarted_at, request
    raise AssertionError(f"no request on {resource_prefix or 'anything'} after the restart")


def _report(restart: _Restart, replicas: _Replicas) -> None:
    """Prints (for `pytest -s`) how soon the restarted process acted, and what the replicas did
    after the kill; timing depends on the machine and is not asserted."""
    any_delay, any_request = _first_after_restart(restart)
    delay, request = _first_after_restart(restart, "deployments")
    gap = restart.restarted_at - restart.kill.at
    print(
        f"\nkilled with {restart.killed_with}; restarted {gap:.2f} s later; the new process was "
        f"listening after "
        f"{restart.listening_at - restart.restarted_at:.2f} s; first API request after "
        f"{any_delay:.2f} s ({any_request.verb} {any_request.path}); resumed acting on the "
        f"Deployments after {delay:.2f} s ({request.verb} {request.path}); plan ended after "
        f"{restart.ended_at - restart.restarted_at:.2f} s\nafter the kill: canary replicas "
        f"{replicas.canary}, stable replicas {replicas.stable}, least asked for "
        f"{replicas.least_asked}, least available {replicas.least_available} (of {REPLICAS})"
    )


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    ("moment", "passed_before", "walked"),
    [
        # Killed with the canary at 2/4: the 25 % stage is behind it, 50 % is checked again.
        pytest.param(_at_half, [25], [50, 75, 100], id="at-the-50%-stage"),
        # Killed with the stable already on the new spec: only the promotion is left.
        pytest.param(_promoting, [], [], id="during-promotion"),
    ],
)
async def test_a_control_plane_killed_mid_canary_finishes_it_after_restart_without_redoing_writes(
    pki: Pki,
    database_url: str,
    lab: KubeApiServer,
    tmp_path: pathlib.Path,
    moment: Callable[[Cluster], bool],
    passed_before: list[int],
    walked: list[int],
) -> None:
    restart = await _kill_mid_canary_and_restart(pki, database_url, lab, tmp_path, moment)
    cluster, done = _timed(lab), restart.done
    requests = [request for _, request in restart.requests]

    # COMPLETED, not ROLLED_BACK: a run's result is stored only when it returns, so the
    # restarted controller finds step 0 RUNNING with no result and runs the same (plan, step,
    # target) again. That run is repeatable: it reuses the change record, adopts the canary its
    # create finds (409), and converges each stage from the cluster's state; nothing failed, so
    # nothing is rolled back.
    assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message
    # One EXECUTING: the stored plan was already EXECUTING and the restarted controller carries
    # on in that phase; a restart is not a transition.
    assert phases(done) == ["PENDING", "VALIDATING", "APPROVED", "EXECUTING", "COMPLETED"]
    [result] = done.steps[0].node_results
    assert (result.state, result.outcome) == (plan_pb2.STEP_STATE_SUCCEEDED, "SUCCEEDED")
    output = json_format.MessageToDict(result.output)

    # The repeated run goes on from where the cluster is: stages the canary had passed are
    # not walked back, and a stable already on the new spec is only promoted.
    def stage(weight: int) -> str:
        return f"canary at {weight}% ({math.ceil(REPLICAS * weight / 100)}/{REPLICAS} replicas)"

    assert output["stages"] == [
        *(f"{stage(w)}: passed before" for w in passed_before),
        *(stage(w) for w in walked),
    ]

    # Promoted: the new version on the stable Deployment with all its replicas; no canary.
    stable = cluster.require("Deployment", NAMESPACE, STABLE)
    assert _image(stable) == NEW_IMAGE
    assert stable["spec"]["replicas"] == REPLICAS
    assert stable["status"]["availableReplicas"] == REPLICAS
    assert cluster.get("Deployment", NAMESPACE, CANARY) is None
    # The undo record is the one made before the first attempt: the old version, 4 replicas.
    defaulted_strategy = {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"},
    }
    previous = {
        "containers": {"main": {"image": OLD_IMAGE, "env": []}},
        "strategy": defaulted_strategy,
        "replicas": REPLICAS,
    }
    change = json.loads(stable["metadata"]["annotations"]["sentinel.io/change"])
    assert change == {"run": f"{restart.plan_id}/s0/do", "previous": previous}
    assert output["previous"] == previous

    # The restarted process read the stable Deployment (its change record) before writing.
    _, first = _first_after_restart(restart, "deployments")
    assert (first.verb, first.resource, first.name) == ("get", "deployments", STABLE)
    # The canary was created once; the repeated run's create found it (409) and adopted it.
    assert [(r.resource, r.code) for r in requests if r.verb == "create"] == [
        ("deployments", 201),
        ("deployments", 409),
    ]
    added = [c.name for c in cluster.deployment_history() if c.type == "ADDED"]
    assert added == [STABLE, CANARY]  # the stable one put by the fixture, then the canary
    # The stable's spec was written twice in all, by either process: the change record, then
    # the promotion; the repeated run found both already there and wrote neither again.
    stable_writes = [
        r
        for r in requests
        if (r.verb, r.resource, r.name, r.code) == ("update", "deployments", STABLE, 200)
    ]
    assert len(stable_writes) == 2
    assert [r.code for r in requests if r.verb == "delete" and r.name == CANARY] == [200]


@pytest.mark.timeout(150)
async def test_a_canary_resumed_after_a_kill_during_promotion_never_shrinks_the_canary_back(
    pki: Pki, database_url: str, lab: KubeApiServer, tmp_path: pathlib.Path
) -> None:
    restart = await _kill_mid_canary_and_restart(pki, database_url, lab, tmp_path, _promoting)
    assert restart.done.phase == plan_pb2.PLAN_PHASE_COMPLETED, restart.done.status_message
    replicas = _replica_history(_timed(lab), restart.kill.resource_version)
    # Going on from the stage reached: the canary's replicas only grow until it is removed,
    # and canary + stable never ask for fewer than the Deployment had.
    growing = [restart.killed_with[CANARY], *replicas.canary[:-1]]
    assert growing == sorted(growing) and replicas.canary[-1] == 0, replicas
    assert replicas.least_asked >= REPLICAS, replicas
