"""The guards of unattended planning (docs/safe-autonomy.md): each plan source's calibration
(how its plans and predictions went) and the autonomy breaker that stops planner plans when
too many roll back or too much of the fleet is unhealthy."""

from controlplane.autonomy._breaker import BreakerState
from controlplane.autonomy._calibration import (
    PLANNER_ROLE,
    Calibration,
    is_planner_plan,
    role_of,
)
from controlplane.autonomy._config import (
    NO_AUTONOMY_FILE,
    AutonomyFile,
    AutonomyFileInvalid,
    BreakerThresholds,
    autonomy_file_path,
    load_autonomy_file,
)
from controlplane.autonomy._guard import ACTOR, HOLD_PREFIX, Autonomy, AutonomyStatus

__all__ = [
    "ACTOR",
    "HOLD_PREFIX",
    "NO_AUTONOMY_FILE",
    "PLANNER_ROLE",
    "Autonomy",
    "AutonomyFile",
    "AutonomyFileInvalid",
    "AutonomyStatus",
    "BreakerState",
    "BreakerThresholds",
    "Calibration",
    "autonomy_file_path",
    "is_planner_plan",
    "load_autonomy_file",
    "role_of",
]
