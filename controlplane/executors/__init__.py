"""Executors: how plan steps are carried out (on nodes through their agents)."""

from controlplane.executors._agent import AgentExecutor, command_id_for
from controlplane.executors._node_actions import KUBERNETES_ACTIONS, NODE_ACTIONS, NodeAction

__all__ = ["KUBERNETES_ACTIONS", "NODE_ACTIONS", "AgentExecutor", "NodeAction", "command_id_for"]
