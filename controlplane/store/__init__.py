"""Persistence of the control plane: schema, migrations and the store thread."""

from controlplane.store._models import AgentRow, Base, CommandRow
from controlplane.store._store import Store, StoreError

__all__ = ["AgentRow", "Base", "CommandRow", "Store", "StoreError"]
