"""What the plans side asks of the autonomy guards (docs/safe-autonomy.md): the policy
variables of a plan's source and of the breaker, and whether the breaker holds a planner plan.
`controlplane.autonomy` provides it; plans only know this protocol."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from controlplane.plans._model import Plan

BREAKER_RULE_ID = "autonomy-breaker"
"""The built-in rule of a plan held by the tripped breaker (not a policy: it cannot be edited
away)."""


class AutonomyGuard(Protocol):
    """The autonomy guards as the desk and the controller see them; every method answers from
    memory (the hot path of SubmitPlan never waits on the store for them)."""

    @property
    def pause_timeout_s(self) -> float:
        """How long a plan paused by the breaker waits for an operator before rolling back."""
        ...

    def source_variables(self, source: str) -> Mapping[str, Any]:
        """The `source` variable of policies: the calibration of the plan's source."""
        ...

    def breaker_variables(self) -> Mapping[str, Any]:
        """The `breaker` variable of policies: {tripped, reason}."""
        ...

    def admission_hold(self, plan: Plan) -> str | None:
        """Why a new plan must wait for an operator (the breaker is tripped and it is a
        planner's), or None."""
        ...

    def wave_hold(self, plan: Plan) -> str | None:
        """Why a running plan must pause before its next wave, or None."""
        ...
