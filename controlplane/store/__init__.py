"""Persistence of the control plane: schema, migrations and the store thread."""

from controlplane.store._models import (
    AGENTS,
    AUDIT_EVENTS,
    COMMANDS,
    LEASES,
    PLAN_TARGETS,
    PLAN_TRANSITIONS,
    PLANS,
    POLICIES,
    AgentRow,
    AuditEventRow,
    Base,
    CommandRow,
    LeaseRow,
    PlanRow,
    PlanTargetRow,
    PlanTransitionRow,
    PolicyRow,
)
from controlplane.store._store import Store, StoreError
from controlplane.store._text import fit, has_nul

__all__ = [
    "AGENTS",
    "AUDIT_EVENTS",
    "COMMANDS",
    "LEASES",
    "PLANS",
    "PLAN_TARGETS",
    "PLAN_TRANSITIONS",
    "POLICIES",
    "AgentRow",
    "AuditEventRow",
    "Base",
    "CommandRow",
    "LeaseRow",
    "PlanRow",
    "PlanTargetRow",
    "PlanTransitionRow",
    "PolicyRow",
    "Store",
    "StoreError",
    "fit",
    "has_nul",
]
