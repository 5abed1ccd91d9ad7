"""Action plans: the model and state machine, submission and approval, and the pipeline
controller that executes them."""

from controlplane.executors import KubernetesObject, Target
from controlplane.plans._controller import PipelineController
from controlplane.plans._desk import (
    FleetView,
    PlanDesk,
    PlannedCommand,
    PlanStateError,
    RequestIdReused,
    SelfApproval,
    Submission,
)
from controlplane.plans._gates import GATE_VARIABLES, HealthGates, gate_expression_problem
from controlplane.plans._lease import LEASE_CHANNEL, Fence, Lease, LeaseLost
from controlplane.plans._model import (
    ALLOWED_TRANSITIONS,
    TERMINAL,
    AnalysisRecord,
    HealthGate,
    IllegalTransition,
    Limits,
    NodeResult,
    Phase,
    Plan,
    Step,
    StepState,
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
    "GATE_VARIABLES",
    "LEASE_CHANNEL",
    "TERMINAL",
    "AnalysisRecord",
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
    "gate_expression_problem",
    "plan_document",
]
