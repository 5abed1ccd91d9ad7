"""Action plans: the model and state machine, submission and approval, and the pipeline
controller that executes them."""

from controlplane.plans._controller import HealthGates, PipelineController
from controlplane.plans._desk import (
    FleetView,
    PlanDesk,
    PlannedCommand,
    PlanStateError,
    RequestIdReused,
    SelfApproval,
    Submission,
)
from controlplane.plans._lease import Fence, Lease, LeaseLost
from controlplane.plans._model import (
    ALLOWED_TRANSITIONS,
    TERMINAL,
    HealthGate,
    IllegalTransition,
    KubernetesObject,
    Limits,
    NodeResult,
    Phase,
    Plan,
    Step,
    StepState,
    Target,
    Transition,
    Violation,
    plan_document,
)
from controlplane.plans._repository import (
    PlanChange,
    PlanConflict,
    PlanFilter,
    PlanNotFound,
    PlanRepository,
)
from controlplane.plans._validate import PlanInvalid, PlanLimitsConfig

__all__ = [
    "ALLOWED_TRANSITIONS",
    "TERMINAL",
    "Fence",
    "FleetView",
    "HealthGate",
    "HealthGates",
    "IllegalTransition",
    "KubernetesObject",
    "Lease",
    "LeaseLost",
    "Limits",
    "NodeResult",
    "Phase",
    "PipelineController",
    "Plan",
    "PlanChange",
    "PlanConflict",
    "PlanDesk",
    "PlanFilter",
    "PlanInvalid",
    "PlanLimitsConfig",
    "PlanNotFound",
    "PlanRepository",
    "PlanStateError",
    "PlannedCommand",
    "RequestIdReused",
    "SelfApproval",
    "Step",
    "StepState",
    "Submission",
    "Target",
    "Transition",
    "Violation",
    "plan_document",
]
