"""The Kubernetes executor: scale, rollout (rolling), restart, cordon, uncordon and drain on
objects of the configured clusters, through the official client.

Every write is a replace (PUT) carrying the resourceVersion it was computed from, so a change
made by someone else meanwhile is a 409 conflict: the object is read again and the change
recomputed, a bounded number of times. Every write names the field manager `sentinel` and
annotates the object with the plan and step. Before a run changes an object it records, on the
object itself (annotation `sentinel.io/change`), what it is about to change; a run repeated after
a control-plane restart finds that record and reuses it, so the undo always converges to the
state seen before the first attempt. Progress is judged as `kubectl rollout status` does, by
watching the object. A run that fails after writing puts back what it changed before it reports
the failure (the controller undoes only successful runs).
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from controlplane.executors._kube_api import Cluster, KubeClusters, KubeError
from controlplane.executors._kube_checks import (
    DEFAULT_SCALE_DOWN_DELAY_S,
    DEFAULT_WEIGHTS,
    KINDS,
    check_parameters,
    check_target,
)
from controlplane.executors._protocol import (
    DryRun,
    FieldChange,
    KubernetesObject,
    Problems,
    RunOutcome,
    StepRun,
    Target,
    TargetKind,
    Undo,
)

log = logging.getLogger(__name__)

FIELD_MANAGER = "sentinel"
ANNOTATION_PLAN = "sentinel.io/plan"
ANNOTATION_STEP = "sentinel.io/step"
ANNOTATION_CHANGE = "sentinel.io/change"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
TRACK_LABEL = "sentinel.io/track"
"""On a canary's pods and selector: which track they are (the stable ones carry none)."""
SIBLING_OF_LABEL = "sentinel.io/progressive-of"
"""On a canary or green Deployment: the stable Deployment it belongs to."""
SIBLING_TRACKS = ("canary", "green")
POD_TEMPLATE_HASH = "pod-template-hash"
MAX_CONFLICT_RETRIES = 5
_EVICTION_RETRY_S = 1.0
_WATCH_SLICE_S = 10.0
OBSERVE_TIMEOUT_S = 5.0
"""How long reading a target's state for the stale-plan guard may take."""

Verdict = tuple[bool, str]
"""(done, failure): done when the object reached what was asked; a failure ends the wait."""


class RunFailed(Exception):
    """The run could not do what was asked; the message says why, for people."""


def _annotations(obj: dict[str, Any]) -> dict[str, str]:
    metadata = obj.setdefault("metadata", {})
    annotations: dict[str, str] = metadata.get("annotations") or {}
    metadata["annotations"] = annotations
    return annotations


def _change_record(obj: dict[str, Any]) -> dict[str, Any]:
    raw = (obj.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_CHANGE, "")
    try:
        record = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _run_id(run: StepRun) -> str:
    return f"{run.plan_id}/s{run.step_index}/{'undo' if run.undo else 'do'}"


def _record(obj: dict[str, Any], run: StepRun, previous: Callable[[], dict[str, Any]]) -> Any:
    """Annotates `obj` with the run and returns what it had before the run's first attempt."""
    record = _change_record(obj)
    before = record["previous"] if record.get("run") == _run_id(run) else previous()
    annotations = _annotations(obj)
    annotations[ANNOTATION_PLAN] = run.plan_id
    annotations[ANNOTATION_STEP] = str(run.step_index)
    annotations[ANNOTATION_CHANGE] = json.dumps(
        {"run": _run_id(run), "previous": before}, sort_keys=True, separators=(",", ":")
    )
    return before


def deployment_progress(obj: Mapping[str, Any]) -> Verdict:
    """As `kubectl rollout status` judges a Deployment."""
    spec, status = obj.get("spec", {}), obj.get("status", {})
    generation = obj.get("metadata", {}).get("generation", 0)
    if status.get("observedGeneration", 0) < generation:
        return False, ""
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and (
            condition.get("reason") == "ProgressDeadlineExceeded"
        ):
            return False, f"ProgressDeadlineExceeded: {condition.get('message', '')}".strip()
    wanted = spec.get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    if updated < wanted:
        return False, ""
    if status.get("replicas", 0) > updated:
        return False, ""
    if status.get("availableReplicas", 0) < updated:
        return False, ""
    return True, ""


def statefulset_progress(obj: Mapping[str, Any]) -> Verdict:
    """As `kubectl rollout status` judges a StatefulSet (rolling updates)."""
    spec, status = obj.get("spec", {}), obj.get("status", {})
    generation = obj.get("metadata", {}).get("generation", 0)
    if status.get("observedGeneration", 0) < generation:
        return False, ""
    wanted = spec.get("replicas", 1)
    if status.get("replicas", 0) != wanted or status.get("readyReplicas", 0) < wanted:
        return False, ""
    current, update = status.get("currentRevision"), status.get("updateRevision")
    if current and update and current != update:
        return False, ""
    return True, ""


class _Workload:
    """The calls one kind of workload needs, bound to one cluster."""

    def __init__(self, cluster: Cluster, kind: str) -> None:
        apps, _, _ = cluster.apis()
        self.cluster = cluster
        self.kind = kind
        if kind == "Deployment":
            self.read = apps.read_namespaced_deployment
            self.replace = apps.replace_namespaced_deployment
            self.read_scale = apps.read_namespaced_deployment_scale
            self.replace_scale = apps.replace_namespaced_deployment_scale
            self.watch_list = apps.list_namespaced_deployment
            self.progress = deployment_progress
        else:
            self.read = apps.read_namespaced_stateful_set
            self.replace = apps.replace_namespaced_stateful_set
            self.read_scale = apps.read_namespaced_stateful_set_scale
            self.replace_scale = apps.replace_namespaced_stateful_set_scale
            self.watch_list = apps.list_namespaced_stateful_set
            self.progress = statefulset_progress


class KubernetesExecutor:
    """Carries out plan steps on Kubernetes objects of the configured clusters."""

    kind = TargetKind.KUBERNETES
    actions = frozenset(KINDS)

    def __init__(self, clusters: KubeClusters, *, opt_in_label: str = "") -> None:
        self._clusters = clusters
        key, _, value = opt_in_label.partition("=")
        self._opt_in = (key.strip(), value.strip()) if key.strip() else None

    def _check_opt_in(self, obj: Mapping[str, Any]) -> None:
        """Refuses to change a workload without the opt-in label (rollback is always allowed:
        it only puts back what a run changed)."""
        if self._opt_in is None:
            return
        key, value = self._opt_in
        labels = obj.get("metadata", {}).get("labels") or {}
        if labels.get(key) != value:
            metadata = obj.get("metadata", {})
            raise RunFailed(
                f"{obj.get('kind', 'object')} {metadata.get('namespace')}/{metadata.get('name')} "
                f"does not carry the opt-in label {key}={value}: plans may not change it"
            )

    # --- the protocol: checks, preview, undo -------------------------------------------------

    def check_parameters(self, action: str, parameters: Mapping[str, Any]) -> Problems:
        return check_parameters(action, parameters)

    def check_target(self, action: str, target: Target) -> Problems:
        assert target.kubernetes is not None
        return check_target(target.kubernetes, action, self._clusters.names)

    def preview(self, action: str, parameters: Mapping[str, Any], target: Target) -> str:
        k = target.kubernetes
        assert k is not None
        where = (
            f"{k.kind} {k.namespace + '/' if k.namespace else ''}{k.name} in cluster {k.cluster}"
        )
        if action == "scale":
            return f"scale {where} to {parameters.get('replicas', 0):g} replicas"
        if action == "rollout":
            changes = []
            if "image" in parameters:
                changes.append(f"image {parameters['image']}")
            if "env" in parameters:
                changes.append("env " + ", ".join(sorted(parameters["env"])))
            strategy = parameters.get("strategy", "rolling")
            container = parameters.get("container")
            return (
                f"roll out {' and '.join(changes)} to container {container} of {where} ({strategy})"
            )
        return f"{action} {where}"

    def undo(
        self, action: str, parameters: Mapping[str, Any], output: Mapping[str, Any]
    ) -> Undo | None:
        previous = output.get("previous")
        if action == "restart" or not isinstance(previous, dict) or not previous:
            return None
        if action in ("cordon", "uncordon", "drain") and previous.get(
            "unschedulable"
        ) == output.get("unschedulable"):
            return None  # the node already was as the run left it
        return Undo("restore", {"previous": previous})

    async def withdraw(self, run: StepRun) -> bool:
        """Runs act at once; there is never a queued one to withdraw."""
        return False

    async def placement(self, target: Target, deadline: dt.datetime) -> list[str]:
        """The nodes the workload's pods (stable and canary or green alike) run on."""
        k = target.kubernetes
        assert k is not None
        if k.kind == "Node":
            return [k.name]
        cluster = self._clusters.get(k.cluster)
        if cluster is None:
            raise LookupError(f"cluster {k.cluster!r} is not configured")
        until = time.monotonic() + (deadline - dt.datetime.now(dt.UTC)).total_seconds()
        workload = _Workload(cluster, k.kind)
        _, core, _ = cluster.apis()
        try:
            obj = await cluster.call("get", workload.read, k.name, k.namespace, deadline=until)
            labels = obj.get("spec", {}).get("selector", {}).get("matchLabels") or {}
            selector = _label_selector(labels)
            listed = await cluster.call(
                "list",
                core.list_namespaced_pod,
                k.namespace,
                label_selector=selector,
                deadline=until,
            )
        except (KubeError, TimeoutError) as exc:
            raise LookupError(f"where {target.key} runs is unknown: {exc}") from exc
        nodes = {pod.get("spec", {}).get("nodeName") for pod in listed.get("items", [])}
        return sorted(node for node in nodes if node)

    async def observe(
        self, action: str, parameters: Mapping[str, Any], target: Target
    ) -> dict[str, str]:
        """One GET of the object: its `resource_version` and `generation` (bumped by the API
        server on every change of the spec), and the fields the action changes —
        `spec.replicas` (scale), the container's image and env (rollout), the restart
        annotation (restart), `spec.unschedulable` (cordon, uncordon, drain)."""
        k = target.kubernetes
        assert k is not None
        cluster = self._clusters.get(k.cluster)
        if cluster is None:
            raise LookupError(f"cluster {k.cluster!r} is not configured")
        deadline = time.monotonic() + OBSERVE_TIMEOUT_S
        try:
            if k.kind == "Node":
                _, core, _ = cluster.apis()
                obj = await cluster.call("get", core.read_node, k.name, deadline=deadline)
            else:
                workload = _Workload(cluster, k.kind)
                obj = await cluster.call(
                    "get", workload.read, k.name, k.namespace, deadline=deadline
                )
        except KubeError as exc:
            if exc.status == 404:
                raise LookupError(f"{target.key} does not exist") from exc
            raise LookupError(f"{target.key} could not be read: {exc}") from exc
        except TimeoutError as exc:
            raise LookupError(
                f"{target.key} could not be read within {OBSERVE_TIMEOUT_S:g} s"
            ) from exc
        metadata = obj.get("metadata", {})
        fields = {"resource_version": str(metadata.get("resourceVersion", ""))}
        if "generation" in metadata:
            fields["generation"] = str(metadata["generation"])
        paths: list[str] = []
        if k.kind == "Node":
            unschedulable = bool(obj.get("spec", {}).get("unschedulable", False))
            fields["spec.unschedulable"] = "true" if unschedulable else "false"
        elif action == "scale":
            paths.append("spec.replicas")
        elif action == "rollout":
            container = str(parameters.get("container", ""))
            paths += [f"containers.{container}.image", f"containers.{container}.env"]
        elif action == "restart":
            paths.append(f"spec.template.metadata.annotations.{RESTARTED_AT}")
        for path in paths:
            fields[path] = _show(_field(obj, path))
        return fields

    async def dry_run(self, run: StepRun) -> DryRun:
        """Asks the API server for a server-side dry run (`dryRun=All`) of the run's writes
        and compares what it answered with what is stored."""
        target = run.target.kubernetes
        assert target is not None
        cluster = self._clusters.get(target.cluster)
        if cluster is None:
            return DryRun(error=f"cluster {target.cluster!r} is not configured")
        remaining = (run.deadline - dt.datetime.now(dt.UTC)).total_seconds()
        deadline = time.monotonic() + remaining
        try:
            if target.kind == "Node":
                changes = await self._dry_run_node(cluster, target, run, deadline)
            else:
                changes = await self._dry_run_workload(cluster, target, run, deadline)
        except (RunFailed, KubeError, TimeoutError) as exc:
            return DryRun(error=str(exc) or "the dry run timed out")
        return DryRun(tuple(changes))

    async def _dry_run_write(
        self,
        cluster: Cluster,
        read: Callable[..., Any],
        replace: Callable[..., Any],
        args: tuple[Any, ...],
        change: Callable[[dict[str, Any]], None],
        deadline: float,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(as stored, as the API server would store it after `change`) without storing."""
        stored: dict[str, Any] = await cluster.call("get", read, *args, deadline=deadline)
        edited = copy.deepcopy(stored)
        change(edited)
        would: dict[str, Any] = await cluster.call(
            "update",
            replace,
            *args,
            edited,
            dry_run="All",
            field_manager=FIELD_MANAGER,
            deadline=deadline,
        )
        return stored, would

    async def _dry_run_workload(
        self, cluster: Cluster, target: KubernetesObject, run: StepRun, deadline: float
    ) -> list[FieldChange]:
        workload = _Workload(cluster, target.kind)
        p = run.parameters
        args = (target.name, target.namespace)
        if run.action == "scale":

            def scale(obj: dict[str, Any]) -> None:
                obj.setdefault("spec", {})["replicas"] = int(p["replicas"])

            before, after = await self._dry_run_write(
                cluster, workload.read_scale, workload.replace_scale, args, scale, deadline
            )
            return _diff(before, after, ("spec.replicas",))

        def change(obj: dict[str, Any]) -> None:
            self._check_opt_in(obj)
            if run.action == "rollout":
                _apply_rollout(obj, p)
            elif run.action == "restart":
                template = obj.setdefault("spec", {}).setdefault("template", {})
                annotations = template.setdefault("metadata", {}).setdefault("annotations", {})
                annotations[RESTARTED_AT] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")

        before, after = await self._dry_run_write(
            cluster, workload.read, workload.replace, args, change, deadline
        )
        fields = ["spec.strategy", f"spec.template.metadata.annotations.{RESTARTED_AT}"]
        for container in (
            after.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or []
        ):
            fields += [
                f"containers.{container['name']}.image",
                f"containers.{container['name']}.env",
            ]
        changes = _diff(before, after, tuple(fields))
        strategy = p.get("strategy", "rolling")
        if run.action == "rollout" and strategy in ("canary", "blue_green"):
            track = "canary" if strategy == "canary" else "green"
            changes.append(
                FieldChange(
                    f"Deployment {target.namespace}/{_sibling_name(target.name, track)}",
                    "absent",
                    "created during the rollout, removed at its end",
                )
            )
        if run.action == "rollout" and strategy == "blue_green":
            _, core, _ = cluster.apis()
            service = await cluster.call(
                "get",
                core.read_namespaced_service,
                str(p["service"]),
                target.namespace,
                deadline=deadline,
            )
            selector = _show(service.get("spec", {}).get("selector"))
            changes.append(
                FieldChange(
                    f"Service {target.namespace}/{p['service']} spec.selector",
                    selector,
                    f"pinned to blue's pods, then green's, then {selector} again",
                )
            )
        return changes

    async def _dry_run_node(
        self, cluster: Cluster, target: KubernetesObject, run: StepRun, deadline: float
    ) -> list[FieldChange]:
        _, core, _ = cluster.apis()

        def change(obj: dict[str, Any]) -> None:
            obj.setdefault("spec", {})["unschedulable"] = run.action != "uncordon"

        before, after = await self._dry_run_write(
            cluster, core.read_node, core.replace_node, (target.name,), change, deadline
        )
        changes = _diff(before, after, ("spec.unschedulable",))
        if run.action == "drain":
            listed = await cluster.call(
                "list",
                core.list_pod_for_all_namespaces,
                field_selector=f"spec.nodeName={target.name}",
                deadline=deadline,
            )
            for pod in listed.get("items", []):
                if not _skipped_by_drain(pod):
                    changes.append(FieldChange(f"pod {_pod_key(pod)}", target.name, "evicted"))
        return changes

    # --- running ---------------------------------------------------------------------------

    async def run(self, run: StepRun) -> RunOutcome:
        target = run.target.kubernetes
        assert target is not None
        cluster = self._clusters.get(target.cluster)
        if cluster is None:
            return RunOutcome(False, "FAILED", f"cluster {target.cluster!r} is not configured")
        remaining = (run.deadline - dt.datetime.now(dt.UTC)).total_seconds()
        deadline = time.monotonic() + remaining
        try:
            if run.undo:
                output = await self._restore(cluster, target, run, deadline)
            elif target.kind == "Node":
                output = await self._node_action(cluster, target, run, deadline)
            else:
                output = await self._workload_action(cluster, target, run, deadline)
        except RunFailed as exc:
            return RunOutcome(False, "FAILED", str(exc), reference=run.target.key)
        except KubeError as exc:
            return RunOutcome(False, "FAILED", str(exc), reference=run.target.key)
        except TimeoutError as exc:
            message = str(exc) or f"the step's time ran out ({remaining:.0f} s)"
            return RunOutcome(False, "TIMED_OUT", message, reference=run.target.key)
        return RunOutcome(True, "SUCCEEDED", output.pop("message", ""), output, run.target.key)

    async def _update(
        self,
        cluster: Cluster,
        read: Callable[..., Any],
        replace: Callable[..., Any],
        args: tuple[Any, ...],
        change: Callable[[dict[str, Any]], None],
        deadline: float,
    ) -> dict[str, Any]:
        """Reads, changes and replaces one object with its resourceVersion as precondition;
        on a 409 conflict reads again and retries. `change` edits a copy of the object in
        place; nothing is written when the copy comes out equal to what was read."""
        for attempt in range(MAX_CONFLICT_RETRIES + 1):
            obj: dict[str, Any] = await cluster.call("get", read, *args, deadline=deadline)
            edited = copy.deepcopy(obj)
            change(edited)
            if edited == obj:
                return obj
            try:
                written: dict[str, Any] = await cluster.call(
                    "update",
                    replace,
                    *args,
                    edited,
                    field_manager=FIELD_MANAGER,
                    deadline=deadline,
                )
                return written
            except KubeError as exc:
                if exc.status != 409 or attempt == MAX_CONFLICT_RETRIES:
                    raise
                log.info("%s: conflict, reading again (attempt %d)", exc, attempt + 1)
        raise AssertionError("unreachable")

    async def _wait(
        self,
        cluster: Cluster,
        read: Callable[..., Any],
        watch_list: Callable[..., Any],
        namespace: str,
        name: str,
        judge: Callable[[Mapping[str, Any]], Verdict],
        deadline: float,
        what: str,
    ) -> dict[str, Any]:
        """Waits, watching the object, until `judge` says done (or fails it)."""
        last_state = "no status yet"
        while True:
            obj: dict[str, Any] = await cluster.call(
                "get", read, name, namespace, deadline=deadline
            )
            done, failure = judge(obj)
            if failure:
                raise RunFailed(f"{what}: {failure}")
            if done:
                return obj
            last_state = _describe_status(obj)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{what}: not done when the step's time ran out ({last_state})")
            rv = obj.get("metadata", {}).get("resourceVersion", "")

            def watch(rv: str = rv, slice_s: float = min(remaining, _WATCH_SLICE_S)) -> None:
                try:
                    for event in cluster.watch(
                        watch_list,
                        namespace,
                        timeout_s=slice_s,
                        field_selector=f"metadata.name={name}",
                        resource_version=rv,
                    ):
                        if event["type"] == "ERROR":
                            return
                        if event["type"] in ("ADDED", "MODIFIED"):
                            done, failure = judge(event["object"])
                            if done or failure:
                                return
                except Exception as exc:  # the next GET reports what is wrong, if anything
                    log.debug("watch of %s ended: %s", name, exc)
                    time.sleep(min(1.0, slice_s))

            await cluster.run_blocking(watch, max(deadline - time.monotonic(), 0) + 6.0)

    # --- workloads ---------------------------------------------------------------------------

    async def _workload_action(
        self, cluster: Cluster, target: KubernetesObject, run: StepRun, deadline: float
    ) -> dict[str, Any]:
        workload = _Workload(cluster, target.kind)
        p = run.parameters
        if run.action == "rollout" and p.get("strategy") == "canary":
            return await self._canary(workload, target, run, deadline)
        if run.action == "rollout" and p.get("strategy") == "blue_green":
            return await self._blue_green(workload, target, run, deadline)
        previous: dict[str, Any] = {}

        def change(obj: dict[str, Any]) -> None:
            self._check_opt_in(obj)
            spec = obj.setdefault("spec", {})
            template = spec.setdefault("template", {})
            if run.action == "scale":
                previous.update(_record(obj, run, lambda: {"replicas": spec.get("replicas", 1)}))
            elif run.action == "rollout":
                previous.update(_record(obj, run, lambda: _rollout_previous(obj, p)))
                _apply_rollout(obj, p)
            elif run.action == "restart":
                record = _change_record(obj)
                _record(obj, run, dict)
                stamp = (
                    record.get("restarted_at")
                    if record.get("run") == _run_id(run)
                    else dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
                )
                pod_annotations = template.setdefault("metadata", {})
                pod_annotations.setdefault("annotations", {})[RESTARTED_AT] = stamp
                change_record = json.loads(_annotations(obj)[ANNOTATION_CHANGE])
                change_record["restarted_at"] = stamp
                _annotations(obj)[ANNOTATION_CHANGE] = json.dumps(
                    change_record, sort_keys=True, separators=(",", ":")
                )

        args = (target.name, target.namespace)
        try:
            await self._update(cluster, workload.read, workload.replace, args, change, deadline)
            if run.action == "scale":
                await self._scale(
                    workload, target.namespace, target.name, int(p["replicas"]), deadline
                )
            what = f"{target.kind} {target.namespace}/{target.name}"
            obj = await self._wait(
                cluster,
                workload.read,
                workload.watch_list,
                target.namespace,
                target.name,
                workload.progress,
                deadline,
                what,
            )
        except (RunFailed, KubeError, TimeoutError) as failure:
            if previous:
                note = await self._put_back(cluster, target, run, previous, deadline)
                raise RunFailed(f"{failure}{note}") from failure
            raise
        output: dict[str, Any] = {
            "previous": previous,
            **_final_state(obj),
            "message": f"{run.action} done: {_describe_status(obj)}",
        }
        if run.action == "scale":
            output["replicas"] = int(p["replicas"])
        return output

    async def _scale(
        self, workload: _Workload, namespace: str, name: str, replicas: int, deadline: float
    ) -> None:
        """Sets the replicas through the scale subresource."""

        def change(scale: dict[str, Any]) -> None:
            scale.setdefault("spec", {})["replicas"] = replicas

        await self._update(
            workload.cluster,
            workload.read_scale,
            workload.replace_scale,
            (name, namespace),
            change,
            deadline,
        )

    async def _put_back(
        self,
        cluster: Cluster,
        target: KubernetesObject,
        run: StepRun,
        previous: dict[str, Any],
        deadline: float,
    ) -> str:
        """After a failed run: restores what it changed; says how that went."""
        # Putting back gets time of its own: the failure may have used up the step's.
        restore_deadline = max(deadline, time.monotonic() + 60.0)
        try:
            await self._apply_previous(cluster, target, run, previous, restore_deadline)
        except (RunFailed, KubeError, TimeoutError) as exc:
            return f"; putting back what it changed failed too: {exc}"
        return "; put back what it changed"

    async def _restore(
        self, cluster: Cluster, target: KubernetesObject, run: StepRun, deadline: float
    ) -> dict[str, Any]:
        previous = dict(run.parameters["previous"])
        await self._apply_previous(cluster, target, run, previous, deadline)
        return {"restored": previous, "message": "restored what the step had changed"}

    async def _apply_previous(
        self,
        cluster: Cluster,
        target: KubernetesObject,
        run: StepRun,
        previous: Mapping[str, Any],
        deadline: float,
    ) -> None:
        """Converges the object to the recorded state; a no-op where it already is."""
        if target.kind == "Node":
            _, core, _ = cluster.apis()
            unschedulable = bool(previous.get("unschedulable", False))

            def node_change(obj: dict[str, Any]) -> None:
                spec = obj.setdefault("spec", {})
                if bool(spec.get("unschedulable", False)) != unschedulable:
                    _record(obj, run, dict)
                    spec["unschedulable"] = unschedulable

            await self._update(
                cluster, core.read_node, core.replace_node, (target.name,), node_change, deadline
            )
            return
        workload = _Workload(cluster, target.kind)

        def change(obj: dict[str, Any]) -> None:
            restored = copy.deepcopy(obj)
            if "containers" in previous or "strategy" in previous:
                _restore_rollout(restored, previous)
            if restored != obj:
                _restore_rollout(obj, previous)
                _record(obj, run, dict)

        await self._update(
            cluster,
            workload.read,
            workload.replace,
            (target.name, target.namespace),
            change,
            deadline,
        )
        if "replicas" in previous:
            await self._scale(
                workload, target.namespace, target.name, int(previous["replicas"]), deadline
            )
        await self._wait(
            cluster,
            workload.read,
            workload.watch_list,
            target.namespace,
            target.name,
            workload.progress,
            deadline,
            f"restoring {target.kind} {target.namespace}/{target.name}",
        )
        if "service" in previous:
            # Back to the Service's own selector (blue's pods, and green's until it goes).
            service = previous["service"]
            await self._set_selector(
                cluster, target.namespace, service["name"], service["selector"], deadline
            )
        await self._remove_siblings(workload, target, deadline)

    async def _wait_ready(
        self, workload: _Workload, namespace: str, name: str, deadline: float
    ) -> dict[str, Any]:
        return await self._wait(
            workload.cluster,
            workload.read,
            workload.watch_list,
            namespace,
            name,
            workload.progress,
            deadline,
            f"{workload.kind} {namespace}/{name}",
        )

    async def _canary(
        self, workload: _Workload, target: KubernetesObject, run: StepRun, deadline: float
    ) -> dict[str, Any]:
        """A second Deployment with the new version takes a growing share of the replicas
        (the stable one shrinking by as much), with analysis after each stage; then the stable
        one takes the new spec and its replicas back, and the canary is removed."""
        p = run.parameters
        previous: dict[str, Any] = {}
        stable: dict[str, Any] = {}

        def record(obj: dict[str, Any]) -> None:
            self._check_opt_in(obj)
            replicas = obj.get("spec", {}).get("replicas", 1)
            previous.update(
                _record(obj, run, lambda: {**_rollout_previous(obj, p), "replicas": replicas})
            )
            stable.update(copy.deepcopy(obj))

        namespace, name = target.namespace, target.name
        await self._update(
            workload.cluster, workload.read, workload.replace, (name, namespace), record, deadline
        )
        total = int(previous["replicas"])
        canary = _sibling_name(name, "canary")
        weights = [int(w) for w in p.get("weights", DEFAULT_WEIGHTS)]
        stages: list[str] = []
        promoted = stable == _with_rollout(stable, p)
        try:
            await self._create_sibling(workload, stable, canary, "canary", run, deadline)
            # A run repeated after a restart goes on from where the cluster is: stages the
            # canary already passed are not walked back (that would shrink it), and a stable
            # that already has the new spec was being promoted.
            existing = await workload.cluster.call(
                "get", workload.read, canary, namespace, deadline=deadline
            )
            reached = int(existing.get("spec", {}).get("replicas") or 0)
            for weight in [] if promoted else weights:
                share = total if weight >= 100 else min(total, math.ceil(total * weight / 100))
                if share < reached:
                    stages.append(f"canary at {weight}% ({share}/{total} replicas): passed before")
                    continue
                # Grow the canary before shrinking the stable: capacity never dips.
                await self._scale(workload, namespace, canary, share, deadline)
                await self._wait_ready(workload, namespace, canary, deadline)
                await self._scale(workload, namespace, name, total - share, deadline)
                await self._wait_ready(workload, namespace, name, deadline)
                point = f"canary at {weight}% ({share}/{total} replicas)"
                why = await run.analyze(point)
                if why is not None:
                    raise RunFailed(f"analysis at {point}: {why}")
                stages.append(point)

            await self._update(
                workload.cluster,
                workload.read,
                workload.replace,
                (name, namespace),
                lambda obj: _apply_rollout(obj, p),
                deadline,
            )
            await self._scale(workload, namespace, name, total, deadline)
            obj = await self._wait_ready(workload, namespace, name, deadline)
            await self._remove_siblings(workload, target, deadline)
        except (RunFailed, KubeError, TimeoutError) as failure:
            note = await self._put_back(workload.cluster, target, run, previous, deadline)
            raise RunFailed(f"{failure}{note}") from failure
        return {
            "previous": previous,
            "stages": stages,
            **_final_state(obj),
            "message": f"canary promoted after {len(stages)} stage(s): {_describe_status(obj)}",
        }

    async def _blue_green(
        self, workload: _Workload, target: KubernetesObject, run: StepRun, deadline: float
    ) -> dict[str, Any]:
        """A full green Deployment with the new version is checked while the Service still
        sends every request to blue (pinned by blue's pod-template-hash); then the Service
        switches to green; blue stays ready for a fast switch back for `scale_down_delay_s`;
        then the stable Deployment takes the new spec (behind the Service, which points at
        green), the Service gets its own selector back, and green is removed. The stable
        Deployment thus keeps its name and role for the next plan."""
        p = run.parameters
        cluster = workload.cluster
        _, core, _ = cluster.apis()
        namespace, name = target.namespace, target.name
        service_name = str(p["service"])
        service = await cluster.call(
            "get", core.read_namespaced_service, service_name, namespace, deadline=deadline
        )
        original = dict(service.get("spec", {}).get("selector") or {})
        recorded_service = _change_record(service)
        if recorded_service.get("run") == _run_id(run):
            original = dict(recorded_service["previous"]["selector"])
        previous: dict[str, Any] = {}
        stable: dict[str, Any] = {}

        def record(obj: dict[str, Any]) -> None:
            self._check_opt_in(obj)
            replicas = obj.get("spec", {}).get("replicas", 1)
            previous.update(
                _record(
                    obj,
                    run,
                    lambda: {
                        **_rollout_previous(obj, p),
                        "replicas": replicas,
                        "service": {"name": service_name, "selector": original},
                    },
                )
            )
            stable.update(copy.deepcopy(obj))

        await self._update(
            cluster, workload.read, workload.replace, (name, namespace), record, deadline
        )
        green = _sibling_name(name, "green")
        stages: list[str] = []
        try:
            blue_hash = await self._current_pod_hash(cluster, stable, deadline)
            await self._set_selector(
                cluster,
                namespace,
                service_name,
                {**original, POD_TEMPLATE_HASH: blue_hash},
                deadline,
                run,
            )
            await self._create_sibling(workload, stable, green, "green", run, deadline)
            await self._scale(workload, namespace, green, int(previous["replicas"]), deadline)
            await self._wait_ready(workload, namespace, green, deadline)
            for point, selector in (
                ("green ready, before the switch", None),
                ("after the switch to green", {**original, TRACK_LABEL: "green"}),
            ):
                if selector is not None:
                    await self._set_selector(
                        cluster, namespace, service_name, selector, deadline, run
                    )
                why = await run.analyze(point)
                if why is not None:
                    raise RunFailed(f"analysis {point}: {why}")
                stages.append(point)
            delay = float(p.get("scale_down_delay_s", DEFAULT_SCALE_DOWN_DELAY_S))
            if time.monotonic() + delay >= deadline:
                raise TimeoutError(
                    f"the step's time runs out before blue's scale-down delay ({delay:g} s) ends"
                )
            await asyncio.sleep(delay)

            await self._update(
                cluster,
                workload.read,
                workload.replace,
                (name, namespace),
                lambda obj: _apply_rollout(obj, p),
                deadline,
            )
            obj = await self._wait_ready(workload, namespace, name, deadline)
            await self._set_selector(cluster, namespace, service_name, original, deadline, run)
            await self._remove_siblings(workload, target, deadline)
        except (RunFailed, KubeError, TimeoutError) as failure:
            note = await self._put_back(cluster, target, run, previous, deadline)
            raise RunFailed(f"{failure}{note}") from failure
        return {
            "previous": previous,
            "stages": stages,
            **_final_state(obj),
            "message": f"blue/green switched and folded back: {_describe_status(obj)}",
        }

    async def _current_pod_hash(
        self, cluster: Cluster, deployment: Mapping[str, Any], deadline: float
    ) -> str:
        """The pod-template-hash most of the Deployment's own pods carry."""
        _, core, _ = cluster.apis()
        labels = deployment.get("spec", {}).get("selector", {}).get("matchLabels") or {}
        selector = _label_selector(labels)
        listed = await cluster.call(
            "list",
            core.list_namespaced_pod,
            deployment["metadata"]["namespace"],
            label_selector=selector,
            deadline=deadline,
        )
        hashes: dict[str, int] = {}
        for pod in listed.get("items", []):
            pod_labels = pod.get("metadata", {}).get("labels") or {}
            if TRACK_LABEL in pod_labels or POD_TEMPLATE_HASH not in pod_labels:
                continue
            hashes[pod_labels[POD_TEMPLATE_HASH]] = hashes.get(pod_labels[POD_TEMPLATE_HASH], 0) + 1
        if not hashes:
            raise RunFailed(
                f"Deployment {deployment['metadata']['name']} has no pods whose traffic the "
                "Service could keep while green starts"
            )
        return max(sorted(hashes), key=lambda h: hashes[h])

    async def _set_selector(
        self,
        cluster: Cluster,
        namespace: str,
        name: str,
        selector: Mapping[str, str],
        deadline: float,
        run: StepRun | None = None,
    ) -> None:
        """Points a Service at `selector`, recording (with `run`) the selector it had first."""
        _, core, _ = cluster.apis()

        def change(obj: dict[str, Any]) -> None:
            spec = obj.setdefault("spec", {})
            current = dict(spec.get("selector") or {})
            if run is not None:
                _record(obj, run, lambda: {"selector": current})
            spec["selector"] = dict(selector)

        await self._update(
            cluster,
            core.read_namespaced_service,
            core.replace_namespaced_service,
            (name, namespace),
            change,
            deadline,
        )

    async def _create_sibling(
        self,
        workload: _Workload,
        stable: Mapping[str, Any],
        name: str,
        track: str,
        run: StepRun,
        deadline: float,
    ) -> None:
        """Creates the canary of `stable` at zero replicas (or finds the one a run before a
        restart created)."""
        apps, _, _ = workload.cluster.apis()
        namespace = stable["metadata"]["namespace"]
        body = _sibling(stable, name, track, run)
        try:
            await workload.cluster.call(
                "create",
                apps.create_namespaced_deployment,
                namespace,
                body,
                field_manager=FIELD_MANAGER,
                deadline=deadline,
            )
        except KubeError as exc:
            if exc.status != 409:
                raise
            existing = await workload.cluster.call(
                "get", workload.read, name, namespace, deadline=deadline
            )
            labels = existing.get("metadata", {}).get("labels") or {}
            if labels.get(SIBLING_OF_LABEL) != stable["metadata"]["name"]:
                raise RunFailed(
                    f"a Deployment {namespace}/{name} exists and is not this rollout's {track}"
                ) from exc

    async def _remove_siblings(
        self, workload: _Workload, target: KubernetesObject, deadline: float
    ) -> None:
        """Deletes the canary a rollout of `target` left behind, if any; only Deployments
        labelled as its own are touched."""
        if workload.kind != "Deployment":
            return
        apps, _, _ = workload.cluster.apis()
        for track in SIBLING_TRACKS:
            name = _sibling_name(target.name, track)
            try:
                existing = await workload.cluster.call(
                    "get", workload.read, name, target.namespace, deadline=deadline
                )
            except KubeError as exc:
                if exc.status == 404:
                    continue
                raise
            if (existing.get("metadata", {}).get("labels") or {}).get(SIBLING_OF_LABEL) != (
                target.name
            ):
                continue
            try:
                await workload.cluster.call(
                    "delete",
                    apps.delete_namespaced_deployment,
                    name,
                    target.namespace,
                    deadline=deadline,
                )
            except KubeError as exc:
                if exc.status != 404:
                    raise

    # --- nodes -------------------------------------------------------------------------------

    async def _set_unschedulable(
        self,
        cluster: Cluster,
        target: KubernetesObject,
        run: StepRun,
        unschedulable: bool,
        deadline: float,
    ) -> dict[str, Any]:
        _, core, _ = cluster.apis()
        previous: dict[str, Any] = {}

        def change(obj: dict[str, Any]) -> None:
            spec = obj.setdefault("spec", {})
            current = bool(spec.get("unschedulable", False))
            record = _change_record(obj)
            before = record["previous"] if record.get("run") == _run_id(run) else None
            previous.update(before or {"unschedulable": current})
            if current != unschedulable:  # only a real change is recorded and written
                _record(obj, run, lambda: {"unschedulable": current})
                spec["unschedulable"] = unschedulable

        await self._update(
            cluster, core.read_node, core.replace_node, (target.name,), change, deadline
        )
        return previous

    async def _node_action(
        self, cluster: Cluster, target: KubernetesObject, run: StepRun, deadline: float
    ) -> dict[str, Any]:
        wanted = run.action != "uncordon"
        previous = await self._set_unschedulable(cluster, target, run, wanted, deadline)
        output: dict[str, Any] = {"previous": previous, "unschedulable": wanted}
        if run.action != "drain":
            output["message"] = f"node {target.name} {'cordoned' if wanted else 'uncordoned'}"
            return output
        try:
            evicted = await _Drain(cluster, target.name, run.parameters, deadline).run()
        except (RunFailed, KubeError, TimeoutError) as failure:
            note = await self._put_back(cluster, target, run, previous, deadline)
            raise RunFailed(f"{failure}{note}") from failure
        output["evicted"] = evicted
        output["message"] = f"node {target.name} drained: {len(evicted)} pod(s) evicted"
        return output


class _Drain:
    """Evicts a cordoned node's pods through the Eviction API, as `kubectl drain` does."""

    def __init__(
        self, cluster: Cluster, node: str, parameters: Mapping[str, Any], deadline: float
    ) -> None:
        self._cluster = cluster
        _, self._core, self._policy = cluster.apis()
        self._node = node
        self._delete_local = bool(parameters.get("delete_emptydir_data", False))
        self._force = bool(parameters.get("force", False))
        self._parallel = int(parameters.get("max_parallel", 5))
        self._deadline = deadline
        self._blocked: dict[str, str] = {}  # pod -> why it could not be evicted yet

    async def run(self) -> list[str]:
        listed = await self._cluster.call(
            "list",
            self._core.list_pod_for_all_namespaces,
            field_selector=f"spec.nodeName={self._node}",
            deadline=self._deadline,
        )
        pods = [pod for pod in listed.get("items", []) if not _skipped_by_drain(pod)]
        refused = [
            f"{_pod_key(pod)} ({why})" for pod in pods if (why := self._refusal(pod)) is not None
        ]
        if refused:
            raise RunFailed(f"cannot drain node {self._node}: " + "; ".join(refused))
        budgets = await self._budgets({pod["metadata"]["namespace"] for pod in pods})
        gate = asyncio.Semaphore(self._parallel)

        async def evict(pod: dict[str, Any]) -> str:
            async with gate:
                return await self._evict(pod, budgets)

        tasks = [asyncio.create_task(evict(pod)) for pod in pods]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    def _refusal(self, pod: Mapping[str, Any]) -> str | None:
        volumes = pod.get("spec", {}).get("volumes") or []
        if not self._delete_local and any("emptyDir" in volume for volume in volumes):
            return "uses local storage (emptyDir): set delete_emptydir_data to evict it"
        owners = pod.get("metadata", {}).get("ownerReferences") or []
        if not self._force and not any(owner.get("controller") for owner in owners):
            return "no controller would recreate it: set force to evict it anyway"
        return None

    async def _budgets(self, namespaces: set[str]) -> list[dict[str, Any]]:
        budgets: list[dict[str, Any]] = []
        for namespace in sorted(namespaces):
            listed = await self._cluster.call(
                "list",
                self._policy.list_namespaced_pod_disruption_budget,
                namespace,
                deadline=self._deadline,
            )
            budgets.extend(listed.get("items", []))
        return budgets

    async def _evict(self, pod: dict[str, Any], budgets: list[dict[str, Any]]) -> str:
        key = _pod_key(pod)
        name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
        body = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace},
        }
        while True:
            try:
                await self._cluster.call(
                    "evict",
                    self._core.create_namespaced_pod_eviction,
                    name,
                    namespace,
                    body,
                    deadline=self._deadline,
                )
                break
            except KubeError as exc:
                if exc.status == 404:
                    return key  # already gone
                if exc.status != 429:
                    raise
                blocking = _blocking_budget(pod, budgets)
                self._blocked[key] = blocking or str(exc)
            except TimeoutError:
                raise self._timed_out(key) from None
            if time.monotonic() + _EVICTION_RETRY_S >= self._deadline:
                raise self._timed_out(key)
            await asyncio.sleep(_EVICTION_RETRY_S)
        await self._gone(pod)
        return key

    def _timed_out(self, key: str) -> RunFailed:
        why = self._blocked.get(key, "the eviction did not finish")
        return RunFailed(f"drain of node {self._node} timed out: pod {key} blocked by {why}")

    async def _gone(self, pod: dict[str, Any]) -> None:
        """Waits until the evicted pod is deleted (or replaced by one with a new uid)."""
        name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
        uid = pod["metadata"].get("uid")
        while True:
            try:
                current = await self._cluster.call(
                    "get", self._core.read_namespaced_pod, name, namespace, deadline=self._deadline
                )
            except KubeError as exc:
                if exc.status == 404:
                    return
                raise
            if current.get("metadata", {}).get("uid") != uid:
                return
            if time.monotonic() + 0.5 >= self._deadline:
                raise RunFailed(f"pod {namespace}/{name} was evicted but is still terminating")
            await asyncio.sleep(0.5)


def _skipped_by_drain(pod: Mapping[str, Any]) -> bool:
    """DaemonSet pods (their controller ignores cordons) and mirror pods (the kubelet's own)
    stay, as `kubectl drain` leaves them."""
    metadata = pod.get("metadata", {})
    if "kubernetes.io/config.mirror" in (metadata.get("annotations") or {}):
        return True
    return any(owner.get("kind") == "DaemonSet" for owner in metadata.get("ownerReferences") or [])


def _pod_key(pod: Mapping[str, Any]) -> str:
    return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"


def _selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects `labels`."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression.get("key"), expression.get("operator")
        values = expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def _blocking_budget(pod: Mapping[str, Any], budgets: list[dict[str, Any]]) -> str:
    labels = pod.get("metadata", {}).get("labels") or {}
    namespace = pod["metadata"]["namespace"]
    for budget in budgets:
        metadata = budget.get("metadata", {})
        if metadata.get("namespace") == namespace and _selects(
            budget.get("spec", {}).get("selector"), labels
        ):
            allowed = budget.get("status", {}).get("disruptionsAllowed", 0)
            return (
                f"PodDisruptionBudget {namespace}/{metadata.get('name')} "
                f"(disruptionsAllowed {allowed})"
            )
    return ""


def _container(obj: Mapping[str, Any], name: str) -> dict[str, Any]:
    containers = obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or []
    for container in containers:
        if container.get("name") == name:
            return dict(container)
    names = ", ".join(c.get("name", "?") for c in containers) or "none"
    raise RunFailed(f"no container named {name!r} (containers: {names})")


def _rollout_previous(obj: Mapping[str, Any], parameters: Mapping[str, Any]) -> dict[str, Any]:
    name = str(parameters["container"])
    container = _container(obj, name)
    return {
        "containers": {
            name: {"image": container.get("image", ""), "env": container.get("env") or []}
        },
        "strategy": obj.get("spec", {}).get("strategy") or {},
    }


def _apply_rollout(obj: dict[str, Any], parameters: Mapping[str, Any]) -> None:
    name = str(parameters["container"])
    _container(obj, name)  # refuses a missing container with its name
    for container in obj["spec"]["template"]["spec"]["containers"]:
        if container.get("name") != name:
            continue
        if "image" in parameters:
            container["image"] = parameters["image"]
        if "env" in parameters:
            env = [dict(e) for e in container.get("env") or []]
            for key, value in sorted(parameters["env"].items()):
                env = [e for e in env if e.get("name") != key]
                env.append({"name": key, "value": value})
            container["env"] = env
    if "max_surge" in parameters or "max_unavailable" in parameters:
        rolling: dict[str, Any] = {}
        for parameter, field in (("max_surge", "maxSurge"), ("max_unavailable", "maxUnavailable")):
            if parameter in parameters:
                value = parameters[parameter]
                rolling[field] = value if isinstance(value, str) else int(value)
        obj["spec"]["strategy"] = {"type": "RollingUpdate", "rollingUpdate": rolling}


def _restore_rollout(obj: dict[str, Any], previous: Mapping[str, Any]) -> None:
    containers = obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or []
    for name, was in (previous.get("containers") or {}).items():
        for container in containers:
            if container.get("name") == name:
                container["image"] = was.get("image", container.get("image"))
                if was.get("env"):
                    container["env"] = was["env"]
                else:
                    container.pop("env", None)
    if previous.get("strategy"):
        obj["spec"]["strategy"] = previous["strategy"]


def _describe_status(obj: Mapping[str, Any]) -> str:
    spec, status = obj.get("spec", {}), obj.get("status", {})
    return (
        f"{status.get('updatedReplicas', 0)}/{spec.get('replicas', 1)} updated, "
        f"{status.get('readyReplicas', 0)} ready, {status.get('availableReplicas', 0)} available"
    )


def _sibling_name(name: str, track: str) -> str:
    return f"{name[: 253 - len(track) - 1]}-{track}"


def _sibling(stable: Mapping[str, Any], name: str, track: str, run: StepRun) -> dict[str, Any]:
    """The canary Deployment of `stable`: its spec with the run's changes, the stable selector's
    labels plus the track label (so the Service, which selects the stable labels, sends it a
    share of the traffic), and no replicas yet."""
    spec = copy.deepcopy(dict(stable["spec"]))
    selector = dict(spec.get("selector") or {})
    selector["matchLabels"] = {**(selector.get("matchLabels") or {}), TRACK_LABEL: track}
    spec["selector"] = selector
    template = spec.setdefault("template", {})
    metadata = template.setdefault("metadata", {})
    metadata["labels"] = {**(metadata.get("labels") or {}), TRACK_LABEL: track}
    spec["replicas"] = 0
    body: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": stable["metadata"]["namespace"],
            "labels": {SIBLING_OF_LABEL: stable["metadata"]["name"], TRACK_LABEL: track},
            "annotations": {
                ANNOTATION_PLAN: run.plan_id,
                ANNOTATION_STEP: str(run.step_index),
            },
        },
        "spec": spec,
    }
    _apply_rollout(body, run.parameters)
    return body


def _field(obj: Mapping[str, Any], path: str) -> Any:
    """A field by dotted path; `containers.<name>.<field>` looks the container up by name."""
    if path.startswith("containers."):
        _, name, field = path.split(".", 2)
        containers = obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers")
        for container in containers or []:
            if container.get("name") == name:
                return container.get(field)
        return None
    if path.startswith("spec.template.metadata.annotations."):
        key = path.removeprefix("spec.template.metadata.annotations.")
        template = obj.get("spec", {}).get("template", {})
        return (template.get("metadata", {}).get("annotations") or {}).get(key)
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _diff(
    before: Mapping[str, Any], after: Mapping[str, Any], fields: tuple[str, ...]
) -> list[FieldChange]:
    changes = []
    for path in fields:
        old, new = _field(before, path), _field(after, path)
        if old != new and not (old in (None, False, []) and new in (None, False, [])):
            changes.append(FieldChange(path, _show(old), _show(new)))
    return changes


def _with_rollout(obj: Mapping[str, Any], parameters: Mapping[str, Any]) -> dict[str, Any]:
    changed = copy.deepcopy(dict(obj))
    _apply_rollout(changed, parameters)
    return changed


def _label_selector(labels: Mapping[str, str]) -> str:
    """matchLabels as the `labelSelector` query parameter writes them."""
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def _final_state(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What a run's output says of the workload it left behind."""
    return {
        "resource_version": obj.get("metadata", {}).get("resourceVersion", ""),
        "ready_replicas": obj.get("status", {}).get("readyReplicas", 0),
    }
