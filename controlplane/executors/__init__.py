"""Executors: how plan steps are carried out. The controller sees only the `Executor` protocol
and the `Executors` registry; the agent executor carries node actions out through node agents,
the Kubernetes executor acts on objects of the configured clusters."""

from controlplane.executors._agent import NODE_ID, AgentExecutor, command_id_for
from controlplane.executors._kube_api import (
    ClusterConfigError,
    ClusterSpec,
    KubeClusters,
    parse_clusters,
)
from controlplane.executors._kubernetes import FIELD_MANAGER, KubernetesExecutor
from controlplane.executors._node_actions import NODE_ACTIONS, NodeAction
from controlplane.executors._protocol import (
    Analysis,
    DryRun,
    Executor,
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

__all__ = [
    "FIELD_MANAGER",
    "NODE_ACTIONS",
    "NODE_ID",
    "AgentExecutor",
    "Analysis",
    "ClusterConfigError",
    "ClusterSpec",
    "DryRun",
    "Executor",
    "Executors",
    "FieldChange",
    "KubeClusters",
    "KubernetesExecutor",
    "KubernetesObject",
    "NodeAction",
    "Problems",
    "RunOutcome",
    "StepRun",
    "Target",
    "TargetKind",
    "Undo",
    "command_id_for",
    "parse_clusters",
]
