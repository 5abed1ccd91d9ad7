"""The seam between the pipeline controller and whatever carries a step out: the `Executor`
protocol, the targets it acts on, and the registry that picks an executor by a target's kind.

The controller knows only this module. An executor validates a step's parameters, previews a
run, runs the step on one target, withdraws a run that has not started, says from what a run
reported how to undo it, and observes the fields of a target a run would change (so that a plan
judged on one state does not act on another). A new kind of target plugs in by registering an
executor for its kind.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Problems = list[tuple[str, str]]
"""(field path relative to the step or target, message) for each problem found."""


class TargetKind(enum.StrEnum):
    """What kind of thing a step acts on; each kind has (at most) one executor."""

    NODE = "node"
    KUBERNETES = "kubernetes"


@dataclass(frozen=True, slots=True)
class KubernetesObject:
    """A Kubernetes object a step acts on, in one of the configured clusters."""

    cluster: str
    namespace: str
    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class Target:
    """One thing a step acts on: a node (by its agent's node id) or a Kubernetes object."""

    node_id: str = ""
    kubernetes: KubernetesObject | None = None

    @property
    def kind(self) -> TargetKind:
        return TargetKind.KUBERNETES if self.kubernetes is not None else TargetKind.NODE

    @property
    def key(self) -> str:
        """The target's name in filters, rate limits and the audit log."""
        if self.kubernetes is not None:
            k = self.kubernetes
            return f"k8s/{k.cluster}/{k.namespace}/{k.kind}/{k.name}"
        return f"node/{self.node_id}"

    @property
    def result_key(self) -> str:
        """What a step's per-target result is filed under: the node id for a node (the API's
        `node_id`), the target key otherwise."""
        return self.node_id if self.kubernetes is None else self.key

    def document(self) -> dict[str, Any]:
        """The target as plain data (policy documents and the stored plan body)."""
        if self.kubernetes is not None:
            return {"kubernetes": dataclasses.asdict(self.kubernetes)}
        return {"node_id": self.node_id}

    @classmethod
    def from_document(cls, data: Mapping[str, Any]) -> Target:
        if "kubernetes" in data:
            return cls(kubernetes=KubernetesObject(**data["kubernetes"]))
        return cls(node_id=data["node_id"])


Analysis = Callable[[str], Awaitable[str | None]]
"""Asks the plan's analysis whether a run may go on at a named point of its progress (e.g.
"canary at 10%"): None when it may, else why not (a failed or inconclusive verdict)."""


async def _no_analysis(point: str) -> str | None:
    return None


@dataclass(frozen=True, slots=True)
class StepRun:
    """One run of one step on one target, as the controller asks for it. The same (plan, step,
    target, undo) must name the same run, so that a controller restarted half-way attaches to a
    run already under way instead of starting a second one."""

    plan_id: str
    step_index: int
    action: str
    parameters: Mapping[str, Any]
    target: Target
    deadline: dt.datetime
    undo: bool = False
    analyze: Analysis = _no_analysis
    """Called between the stages of a progressive run (canary weights, blue/green switch)."""


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """What a run did: the outcome word (SUCCEEDED, FAILED, TIMED_OUT, CORDONED, ...), a message
    for people, the output the executor's `undo` reads, and the reference under which the run is
    recorded (a command id for agents)."""

    succeeded: bool
    outcome: str
    message: str = ""
    output: Mapping[str, Any] = field(default_factory=dict)
    reference: str = ""


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One field a run would change: where, what it holds now, what it would hold."""

    field: str
    before: str
    after: str


@dataclass(frozen=True, slots=True)
class DryRun:
    """What a run would change, as its target's owner (an API server) answered a dry run; or
    why the dry run could not be made."""

    changes: tuple[FieldChange, ...] = ()
    error: str = ""


@dataclass(frozen=True, slots=True)
class Undo:
    """The action and parameters that put a target back as a run found it."""

    action: str
    parameters: dict[str, Any]


@runtime_checkable
class Executor(Protocol):
    """Carries out plan steps on targets of one kind."""

    @property
    def kind(self) -> TargetKind:
        """The kind of target this executor acts on."""
        ...

    @property
    def actions(self) -> frozenset[str]:
        """The actions it can carry out."""
        ...

    def check_parameters(self, action: str, parameters: Mapping[str, Any]) -> Problems:
        """Every problem with a step's parameters, paths relative to `parameters`."""
        ...

    def check_target(self, action: str, target: Target) -> Problems:
        """Every problem with one target of a step, paths relative to the target."""
        ...

    def preview(self, action: str, parameters: Mapping[str, Any], target: Target) -> str:
        """What running the step on `target` would do, in one line for people."""
        ...

    async def run(self, run: StepRun) -> RunOutcome:
        """Runs (or attaches to the run already under way for) one step on one target."""
        ...

    async def placement(self, target: Target, deadline: dt.datetime) -> list[str]:
        """The Kubernetes nodes `target` runs on (a workload's pods), so that the telemetry of
        their agents can judge it; empty for a node target, whose own agent is known. Raises
        LookupError, with the reason, when it cannot be found out."""
        ...

    async def dry_run(self, run: StepRun) -> DryRun:
        """What `run` would change, asked of the target's owner without changing anything;
        empty where the target has no dry run (the preview's summary says what it does)."""
        ...

    async def withdraw(self, run: StepRun) -> bool:
        """Withdraws a run that has not started acting yet; True when it was withdrawn."""
        ...

    async def observe(
        self, action: str, parameters: Mapping[str, Any], target: Target
    ) -> dict[str, str]:
        """The current values, as text, of the fields of `target` that running `action` with
        `parameters` would change (e.g. "gpu.0.power_limit_watts" -> "700"); empty when there
        is nothing to observe. Read-only and bounded in time; raises LookupError, with the
        reason, when the target cannot be observed now (no telemetry yet, API unreachable)."""
        ...

    def undo(
        self, action: str, parameters: Mapping[str, Any], output: Mapping[str, Any]
    ) -> Undo | None:
        """How to undo a successful run, from what it reported; None when nothing changed."""
        ...


class Executors:
    """The executors of this control plane, one per target kind."""

    def __init__(self, executors: Iterable[Executor]) -> None:
        self._by_kind: dict[TargetKind, Executor] = {}
        for executor in executors:
            if executor.kind in self._by_kind:
                raise ValueError(f"two executors for {executor.kind} targets")
            self._by_kind[executor.kind] = executor

    def for_kind(self, kind: TargetKind) -> Executor | None:
        return self._by_kind.get(kind)

    def for_target(self, target: Target) -> Executor:
        """The executor of `target`'s kind; validation has made sure there is one."""
        executor = self._by_kind.get(target.kind)
        if executor is None:
            raise LookupError(f"no executor for {target.kind} targets")
        return executor

    def missing_kinds(self) -> list[TargetKind]:
        """Kinds of target this control plane cannot act on."""
        return [kind for kind in TargetKind if kind not in self._by_kind]
