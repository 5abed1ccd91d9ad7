"""Persistence of the control plane: schema, migrations and the store thread."""

from controlplane.store._models import AGENTS, COMMANDS, AgentRow, Base, CommandRow
from controlplane.store._store import Store, StoreError

__all__ = ["AGENTS", "COMMANDS", "AgentRow", "Base", "CommandRow", "Store", "StoreError"]
