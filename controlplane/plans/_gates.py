"""Health gates: what a gate expression may refer to, and how gates are judged on fresh
telemetry between the waves of a step."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from controlplane.plans._model import HealthGate
from controlplane.policy import ExpressionError, compile_expression, expression_problem
from controlplane.telemetry import Sample

GATE_VARIABLES = frozenset({"sample", "node_id"})
"""The variables a gate expression sees: the node's newest sample (as plain data) and its id."""

P = TypeVar("P")

_TRACER = trace.get_tracer(__name__)


def gate_expression_problem(source: str) -> str | None:
    """Why a health-gate expression cannot be used, or None."""
    return expression_problem(source, GATE_VARIABLES, "health gates")


class HealthGates(Generic[P]):
    """Judges health gates on fresh telemetry: only samples newer than the moment the check
    starts count, and a node that sends none within the window makes the gate inconclusive,
    which fails it — no data is never a pass.

    `latest` gives a node's newest sample; `as_data` turns its payload into the plain data gate
    expressions see, and is called only once a sample is known to be fresh."""

    def __init__(
        self,
        latest: Callable[[str], Sample[P] | None],
        as_data: Callable[[P], Mapping[str, Any]],
        poll_interval_s: float = 0.1,
    ) -> None:
        self._latest = latest
        self._as_data = as_data
        self._poll_interval_s = poll_interval_s

    def _seq(self, node: str) -> int:
        sample = self._latest(node)
        return 0 if sample is None else sample.seq

    async def check(
        self, gates: Sequence[HealthGate], nodes: Sequence[str], *, point: str = ""
    ) -> str | None:
        """None when every gate holds on every node, else why not. Each gate is traced as a
        `gate` span with its verdict (`point` says where in the plan, e.g. "after wave 0")."""
        if not gates or not nodes:
            return None
        baseline = {node: self._seq(node) for node in nodes}
        for gate in gates:
            with _TRACER.start_as_current_span(
                "gate",
                attributes={
                    "sentinel.gate.name": gate.name,
                    "sentinel.gate.kind": "telemetry",
                    "sentinel.gate.point": point,
                    "sentinel.gate.nodes": len(nodes),
                },
            ) as span:
                verdict, problem = await self._check_one(gate, nodes, baseline)
                span.set_attribute("sentinel.gate.verdict", verdict)
                if problem is not None:
                    span.set_status(Status(StatusCode.ERROR, problem))
                    return problem
        return None

    async def _check_one(
        self, gate: HealthGate, nodes: Sequence[str], baseline: Mapping[str, int]
    ) -> tuple[str, str | None]:
        """(verdict, why it did not pass) of one gate: passed, failed or inconclusive."""
        try:
            expression = compile_expression(gate.expression)
        except ExpressionError as exc:
            return "inconclusive", f"health gate {gate.name!r} does not compile: {exc}"
        waiting = set(nodes)
        give_up = time.monotonic() + gate.window_s
        while waiting:
            for node in sorted(waiting):
                latest = self._latest(node)
                if latest is None or latest.seq <= baseline[node]:
                    continue
                waiting.discard(node)
                try:
                    sample = self._as_data(latest.payload)
                    value = expression.evaluate({"sample": sample, "node_id": node})
                except ExpressionError as exc:
                    return (
                        "inconclusive",
                        f"health gate {gate.name!r} inconclusive on {node}: {exc}",
                    )
                if value is not True:
                    return "failed", f"health gate {gate.name!r} failed on {node}"
            if waiting:
                if time.monotonic() >= give_up:
                    return "inconclusive", (
                        f"health gate {gate.name!r} inconclusive: no fresh telemetry from "
                        f"{', '.join(sorted(waiting))} within {gate.window_s:g} s"
                    )
                await asyncio.sleep(self._poll_interval_s)
        return "passed", None
