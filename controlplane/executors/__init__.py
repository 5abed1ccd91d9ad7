"""Executors: how plan steps are carried out. The controller sees only the `Executor` protocol
and the `Executors` registry; the agent executor carries node actions out through node agents."""

from controlplane.executors._agent import NODE_ID, AgentExecutor, command_id_for
from controlplane.executors._node_actions import NODE_ACTIONS, NodeAction
from controlplane.executors._protocol import (
    Executor,
    Executors,
    KubernetesObject,
    Problems,
    RunOutcome,
    StepRun,
    Target,
    TargetKind,
    Undo,
)

__all__ = [
    "NODE_ACTIONS",
    "NODE_ID",
    "AgentExecutor",
    "Executor",
    "Executors",
    "KubernetesObject",
    "NodeAction",
    "Problems",
    "RunOutcome",
    "StepRun",
    "Target",
    "TargetKind",
    "Undo",
    "command_id_for",
]
