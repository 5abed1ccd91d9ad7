"""Analysis between rollout steps: Prometheus query gates, checked at submission, measured
against a real Prometheus, and judged passed, failed or inconclusive as Argo Rollouts' analysis
judges them, with every measurement kept for the plan's record and the audit log."""

from controlplane.analysis._gate import (
    CONDITION_VARIABLES,
    DEFAULT_CONSECUTIVE_ERROR_LIMIT,
    PLACEHOLDERS,
    GateInvalid,
    PrometheusGate,
    check_gate,
    resolve_query,
)
from controlplane.analysis._measure import (
    Measurement,
    MeasurementVerdict,
    ResultValue,
    judge,
    measure,
)
from controlplane.analysis._run import (
    ERROR_RETRY_INTERVAL_S,
    GateOutcome,
    GateVerdict,
    MeasurementCallback,
    run_gate,
)

__all__ = [
    "CONDITION_VARIABLES",
    "DEFAULT_CONSECUTIVE_ERROR_LIMIT",
    "ERROR_RETRY_INTERVAL_S",
    "PLACEHOLDERS",
    "GateInvalid",
    "GateOutcome",
    "GateVerdict",
    "Measurement",
    "MeasurementCallback",
    "MeasurementVerdict",
    "PrometheusGate",
    "ResultValue",
    "check_gate",
    "judge",
    "measure",
    "resolve_query",
    "run_gate",
]
