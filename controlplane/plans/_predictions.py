"""Predicted effects and outcomes: the telemetry metrics predictions and outcomes are stated
in, a short per-node history of them, and the check of a plan's predictions after its last step.

Payloads are read by attribute (`gpus`, `host.cpu`), the shape of the agent's
`TelemetrySample`, so the domain stays free of protobuf. Values are taken per GPU (or per host);
a field the GPU named in `unsupported` is left out rather than read as zero.
"""

from __future__ import annotations

import array
import asyncio
import collections
import dataclasses
import datetime as dt
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from controlplane.plans._model import (
    Aggregation,
    MetricSummary,
    MissAction,
    Prediction,
    PredictionResult,
    PredictionVerdict,
)
from controlplane.policy import (
    Expression,
    ExpressionError,
    compile_expression,
    expression_problem,
)
from controlplane.telemetry import Sample

PREDICTION_VARIABLES = frozenset({"value", "samples"})
"""What a prediction's expression sees: the aggregated metric and each node's newest sample."""

MAX_PREDICTIONS = 20
MAX_PREDICTION_WINDOW_S = 24 * 3600.0
HISTORY_S = 60.0
"""How far back the per-node history reaches: the window summarised before a plan's first step."""
HISTORY_SAMPLES = 24
"""At most this many samples per node are kept, one per `HISTORY_S / HISTORY_SAMPLES` seconds."""
WATCHED_SAMPLES = 256
"""At most this many samples are kept of a node whose plan is being checked (its after window)."""

_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$")


@dataclasses.dataclass(frozen=True, slots=True)
class Metric:
    """A named telemetry metric: its unit and how to read its values from one sample."""

    unit: str
    description: str
    read: Callable[[Any], list[float]]


def _gpu_values(field: str, scale: float = 1.0) -> Callable[[Any], list[float]]:
    def read(payload: Any) -> list[float]:
        return [
            getattr(gpu, field) * scale
            for gpu in payload.gpus
            if not (gpu.unsupported and field in gpu.unsupported)
        ]

    return read


def _gpu_memory_used_percent(payload: Any) -> list[float]:
    return [
        100.0 * gpu.memory_used_bytes / gpu.memory_total_bytes
        for gpu in payload.gpus
        if gpu.memory_total_bytes
    ]


def _host_cpu_percent(payload: Any) -> list[float]:
    return [float(payload.host.cpu.utilization_percent)] if payload.HasField("host") else []


def _host_memory_used_percent(payload: Any) -> list[float]:
    if not payload.HasField("host") or not payload.host.memory.total_bytes:
        return []
    memory = payload.host.memory
    return [100.0 * memory.used_bytes / memory.total_bytes]


METRICS: Mapping[str, Metric] = {
    "gpu.power_watts": Metric(
        "W", "power draw of each GPU", _gpu_values("power_usage_milliwatts", 0.001)
    ),
    "gpu.power_limit_watts": Metric(
        "W", "enforced power limit of each GPU", _gpu_values("power_limit_milliwatts", 0.001)
    ),
    "gpu.utilization_percent": Metric(
        "%", "busy share of each GPU", _gpu_values("utilization_gpu_percent")
    ),
    "gpu.memory_utilization_percent": Metric(
        "%", "memory-controller busy share of each GPU", _gpu_values("utilization_memory_percent")
    ),
    "gpu.memory_used_percent": Metric(
        "%", "share of each GPU's memory in use", _gpu_memory_used_percent
    ),
    "gpu.temperature_celsius": Metric(
        "°C", "temperature of each GPU", _gpu_values("temperature_celsius")
    ),
    "gpu.sm_clock_mhz": Metric("MHz", "SM clock of each GPU", _gpu_values("sm_clock_mhz")),
    "host.cpu_percent": Metric("%", "busy share of the host's CPUs", _host_cpu_percent),
    "host.memory_used_percent": Metric(
        "%", "share of the host's memory in use", _host_memory_used_percent
    ),
}
"""The metric vocabulary of predictions: one value per GPU (`gpu.*`) or per host (`host.*`)."""

SUMMARY_METRICS = (
    "gpu.power_watts",
    "gpu.utilization_percent",
    "gpu.temperature_celsius",
    "gpu.memory_used_percent",
)
"""The metrics a plan's outcome summarises per node, before the first step and after the last."""


def metric_values(metric: str, payloads: Iterable[Any]) -> list[float]:
    """Every value of `metric` in these samples (one per GPU, or one per host)."""
    read = METRICS[metric].read
    return [value for payload in payloads for value in read(payload)]


def _p95(ordered: Sequence[float]) -> float:
    """The 95th percentile by nearest rank (a value that was measured, never interpolated)."""
    return ordered[max(math.ceil(0.95 * len(ordered)) - 1, 0)]


def aggregate(values: Sequence[float], how: Aggregation) -> float:
    """`values` folded into one number (they must not be empty)."""
    if how == Aggregation.MIN:
        return min(values)
    if how == Aggregation.MAX:
        return max(values)
    if how == Aggregation.P95:
        return _p95(sorted(values))
    return math.fsum(values) / len(values)


def summarize(values: Sequence[float], start: dt.datetime, end: dt.datetime) -> MetricSummary:
    """Mean, p95, min and max of `values` over the window [start, end], rounded to 0.001 (the
    agents' own resolution, and what the float32 history keeps exactly); zeros when empty."""
    bounds = (start.isoformat(), end.isoformat())
    if not values:
        return MetricSummary(0.0, 0.0, 0.0, 0.0, 0, *bounds)
    ordered = sorted(values)
    mean = math.fsum(ordered) / len(ordered)
    return MetricSummary(
        round(mean, 3),
        round(_p95(ordered), 3),
        round(ordered[0], 3),
        round(ordered[-1], 3),
        len(ordered),
        *bounds,
    )


# --- validation -------------------------------------------------------------------------------


def prediction_problems(predictions: Sequence[Prediction]) -> list[tuple[str, str]]:
    """Problems of a plan's predictions as (path under `plan.`, message)."""
    problems: list[tuple[str, str]] = []
    if len(predictions) > MAX_PREDICTIONS:
        problems.append(("predictions", f"at most {MAX_PREDICTIONS}, got {len(predictions)}"))
    names: dict[str, int] = {}
    for i, prediction in enumerate(predictions):
        at = f"predictions[{i}]"
        if not _NAME.match(prediction.name):
            problems.append((f"{at}.name", "required: 1-128 letters, digits, '.', '_' or '-'"))
        elif prediction.name in names:
            problems.append((f"{at}.name", f"duplicate of predictions[{names[prediction.name]}]"))
        else:
            names[prediction.name] = i
        if prediction.metric and prediction.metric not in METRICS:
            known = ", ".join(sorted(METRICS))
            problems.append(
                (f"{at}.metric", f"unknown metric {prediction.metric!r}; known: {known}")
            )
        problem = _expression_problem(prediction)
        if problem is not None:
            problems.append((f"{at}.expression", problem))
        if not 0 < prediction.window_s <= MAX_PREDICTION_WINDOW_S:
            problems.append(
                (f"{at}.window", f"must be within (0, {MAX_PREDICTION_WINDOW_S:g}] seconds")
            )
        if not math.isfinite(prediction.confidence) or not 0 <= prediction.confidence <= 1:
            problems.append(
                (f"{at}.confidence", f"must be within [0, 1], got {prediction.confidence}")
            )
    return problems


def _expression_problem(prediction: Prediction) -> str | None:
    if not prediction.expression.strip():
        return "required: a CEL expression over `value` (and `samples`), e.g. 'value <= 460.0'"
    if len(prediction.expression) > 10_000:
        return "at most 10000 characters"
    problem = expression_problem(prediction.expression, PREDICTION_VARIABLES, "predictions")
    if problem is not None:
        return problem
    if not prediction.metric and "value" in compile_expression(prediction.expression).variables:
        return "uses `value`, but the prediction names no metric"
    return None


# --- history ----------------------------------------------------------------------------------


class TelemetryHistory:
    """A short history of every node's summary metrics, for the outcome of plans: compact (per
    sample one float32 array, a value per GPU and metric, NaN where the GPU could not read it)
    and cheap on the hot path. Times are when a sample arrived here (agent clocks may differ).

    An idle node keeps at most one sample per `window_s / max_samples` (2.5 s): the last
    minute in at most 24 samples, whatever its telemetry interval, and samples in between cost
    one dict lookup. A watched node (one whose plan is being checked after its last step)
    keeps every sample, up to `watched_samples`."""

    def __init__(
        self,
        *,
        window_s: float = HISTORY_S,
        max_samples: int = HISTORY_SAMPLES,
        watched_samples: int = WATCHED_SAMPLES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._window_s = window_s
        self._max_samples = max_samples
        self._watched_samples = watched_samples
        self._spacing_s = window_s / max_samples
        self._clock = clock
        self._nodes: dict[str, collections.deque[tuple[float, array.array[float]]]] = {}
        self._watched: collections.Counter[str] = collections.Counter()

    def record(self, samples: Iterable[Sample[Any]]) -> None:
        """Keeps the summary metrics of these samples (the per-sample cost of the hot path)."""
        now = self._clock()
        oldest = now - self._window_s
        nodes, watched = self._nodes, self._watched
        for sample in samples:
            node_id = sample.node_id
            ring = nodes.get(node_id)
            if ring is None:
                ring = nodes[node_id] = collections.deque(maxlen=self._max_samples)
            elif node_id not in watched:
                if ring and now - ring[-1][0] < self._spacing_s:
                    continue
                while ring and ring[0][0] < oldest:
                    ring.popleft()
            ring.append((now, _summary_values(sample.payload)))

    def watch(self, node_ids: Iterable[str]) -> None:
        """Keeps every sample of these nodes until `unwatch` (calls nest)."""
        for node_id in node_ids:
            self._watched[node_id] += 1
            if self._watched[node_id] == 1:
                ring = self._nodes.get(node_id, ())
                self._nodes[node_id] = collections.deque(ring, maxlen=self._watched_samples)

    def unwatch(self, node_ids: Iterable[str]) -> None:
        for node_id in node_ids:
            self._watched[node_id] -= 1
            if self._watched[node_id] <= 0:
                del self._watched[node_id]
                ring = self._nodes.get(node_id, ())
                self._nodes[node_id] = collections.deque(ring, maxlen=self._max_samples)

    def summaries(
        self, node_id: str, start: dt.datetime, end: dt.datetime
    ) -> dict[str, MetricSummary]:
        """Each summary metric of the node over the samples that arrived within [start, end]."""
        low, high = start.timestamp(), end.timestamp()
        columns: list[list[float]] = [[] for _ in SUMMARY_METRICS]
        width = len(SUMMARY_METRICS)
        for at, values in self._nodes.get(node_id, ()):
            if not low <= at <= high:
                continue
            for i, value in enumerate(values):
                if not math.isnan(value):
                    columns[i % width].append(value)
        return {
            metric: summarize(column, start, end)
            for metric, column in zip(SUMMARY_METRICS, columns, strict=True)
        }


_UNSUPPORTED = frozenset(
    {"power_usage_milliwatts", "utilization_gpu_percent", "temperature_celsius"}
)


def _summary_values(payload: Any) -> array.array[float]:
    """The `SUMMARY_METRICS` of each GPU of one sample, GPU after GPU."""
    nan = math.nan
    values: list[float] = []
    for gpu in payload.gpus:
        total = gpu.memory_total_bytes
        values += (
            gpu.power_usage_milliwatts / 1000,
            gpu.utilization_gpu_percent,
            gpu.temperature_celsius,
            100.0 * gpu.memory_used_bytes / total if total else nan,
        )
        if gpu.unsupported and not _UNSUPPORTED.isdisjoint(gpu.unsupported):
            unsupported = set(gpu.unsupported)
            for offset, field in enumerate(
                ("power_usage_milliwatts", "utilization_gpu_percent", "temperature_celsius")
            ):
                if field in unsupported:
                    values[offset - 4] = nan
    return array.array("f", values)


# --- verification -----------------------------------------------------------------------------


def _number(value: float) -> str:
    return f"{value:.6g}"


@dataclasses.dataclass(slots=True)
class _Pending:
    prediction: Prediction
    expression: Expression | None
    deadline: float
    value: float | None = None
    problem: str = ""
    judged: bool = False
    samples: int = 0


class PredictionChecker:
    """Judges a plan's predictions on fresh telemetry after its last step: only samples newer
    than the check's start count, every node must have sent one before a judgement, and each
    new sample brings a new one. HELD as soon as the expression is true; when the window
    passes, MISSED (with the last value measured) or, without any judgement, INCONCLUSIVE.

    `latest` gives a node's newest sample; `as_data` turns a payload into the plain data the
    expression sees as `samples`."""

    def __init__(
        self,
        latest: Callable[[str], Sample[Any] | None],
        as_data: Callable[[Any], Mapping[str, Any]],
        *,
        poll_interval_s: float = 0.1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._latest = latest
        self._as_data = as_data
        self._poll_interval_s = poll_interval_s
        self._clock = clock

    async def verify(
        self,
        predictions: Sequence[Prediction],
        nodes: Sequence[str],
        *,
        finished_at: dt.datetime,
        plan_confidence: float,
        decided: Callable[[PredictionResult], Awaitable[None]],
        stop: Callable[[], Awaitable[bool]] | None = None,
        stop_interval_s: float = 1.0,
    ) -> bool:
        """Judges `predictions` until each has a verdict, handed to `decided` as it comes.
        Windows count from `finished_at` (a restarted check has what is left of them).
        Returns False when `stop` said to stop first (the undecided ones stay undecided)."""
        start = finished_at.timestamp()
        pending: list[_Pending] = []
        for prediction in predictions:
            try:
                expression: Expression | None = compile_expression(prediction.expression)
                problem = ""
            except ExpressionError as exc:
                expression, problem = None, f"does not compile: {exc}"
            pending.append(_Pending(prediction, expression, start + prediction.window_s))
            pending[-1].problem = problem
        baseline = {node: self._seq(node) for node in nodes}
        judged_at: dict[str, int] = dict(baseline)
        next_stop_check = self._clock() + stop_interval_s

        async def verdict(item: _Pending, held: bool, now: float) -> None:
            result = self._result(item, held, now, start, nodes, baseline, plan_confidence)
            pending.remove(item)
            await decided(result)

        while pending:
            fresh = {n: s for n in nodes if (s := self._latest(n)) is not None}
            fresh = {n: s for n, s in fresh.items() if s.seq > baseline[n]}
            now = self._clock()
            if (
                nodes
                and len(fresh) == len(nodes)
                and any(s.seq != judged_at[n] for n, s in fresh.items())
            ):
                judged_at = {n: s.seq for n, s in fresh.items()}
                for item in [p for p in pending if self._judge(p, fresh)]:
                    await verdict(item, True, now)
            for item in [p for p in pending if now >= p.deadline]:
                await verdict(item, False, now)
            if not pending:
                break
            if stop is not None and now >= next_stop_check:
                next_stop_check = now + stop_interval_s
                if await stop():
                    return False
            await asyncio.sleep(self._poll_interval_s)
        return True

    def _seq(self, node: str) -> int:
        sample = self._latest(node)
        return 0 if sample is None else sample.seq

    def _judge(self, item: _Pending, fresh: Mapping[str, Sample[Any]]) -> bool:
        """Evaluates one prediction on the nodes' fresh samples; True when it holds."""
        if item.expression is None:
            return False
        prediction = item.prediction
        item.samples = len(fresh)
        value = 0.0
        if prediction.metric:
            values = metric_values(prediction.metric, (s.payload for s in fresh.values()))
            if not values:
                item.problem = f"the targets' samples have no {prediction.metric} values"
                return False
            value = aggregate(values, prediction.aggregation)
        variables: dict[str, Any] = {"value": value}
        if "samples" in item.expression.variables:
            variables["samples"] = {n: self._as_data(s.payload) for n, s in fresh.items()}
        try:
            outcome = item.expression.evaluate(variables)
        except ExpressionError as exc:
            item.problem = f"could not be evaluated: {exc}"
            return False
        item.judged, item.problem = True, ""
        item.value = value if prediction.metric else None
        return outcome is True

    def _result(
        self,
        item: _Pending,
        held: bool,
        now: float,
        start: float,
        nodes: Sequence[str],
        baseline: Mapping[str, int],
        plan_confidence: float,
    ) -> PredictionResult:
        prediction = item.prediction
        what = ""
        if item.value is not None:
            what = (
                f"value {_number(item.value)} "
                f"({prediction.aggregation.value.lower()} {prediction.metric}), "
            )
        if held:
            verdict = PredictionVerdict.HELD
            message = (
                f"prediction {prediction.name!r} held: {what}{prediction.expression} "
                f"after {now - start:.1f} s"
            )
        elif item.judged and not item.problem:
            verdict = PredictionVerdict.MISSED
            message = (
                f"prediction {prediction.name!r} missed: {what}expected {prediction.expression}, "
                f"within {prediction.window_s:g} s"
            )
        else:
            verdict = PredictionVerdict.INCONCLUSIVE
            why = item.problem
            if not why:
                silent = [
                    n for n in nodes if (s := self._latest(n)) is None or s.seq <= baseline[n]
                ]
                why = (
                    f"no fresh telemetry from {', '.join(silent)}"
                    if silent
                    else "no node target to judge it on"
                    if not nodes
                    else "no judgement"
                )
            message = (
                f"prediction {prediction.name!r} inconclusive: {why} "
                f"within {prediction.window_s:g} s"
            )
        return PredictionResult(
            name=prediction.name,
            verdict=verdict,
            observed=item.value,
            message=message,
            time_to_effect_s=max(now - start, 0.0) if held else None,
            checked_at=dt.datetime.fromtimestamp(now, dt.UTC).isoformat(),
            samples=item.samples,
            confidence=prediction.confidence or plan_confidence,
        )


def outcome_time_to_effect(
    predictions: Sequence[Prediction], results: Sequence[PredictionResult]
) -> float | None:
    """From the end of the last step until every prediction held: the longest time to effect,
    when all held; None when one did not (or is undecided) or there are none."""
    if not predictions:
        return None
    by_name = {r.name: r for r in results}
    times: list[float] = []
    for prediction in predictions:
        result = by_name.get(prediction.name)
        if (
            result is None
            or result.verdict != PredictionVerdict.HELD
            or result.time_to_effect_s is None
        ):
            return None
        times.append(result.time_to_effect_s)
    return max(times)


def prediction_verdicts(
    predictions: Sequence[Prediction], results: Sequence[PredictionResult]
) -> tuple[list[str], list[str]]:
    """The messages of the predictions that did not hold: (those only recorded, those that
    roll the plan back). A prediction without a verdict counts as not held."""
    by_name = {r.name: r for r in results}
    recorded: list[str] = []
    roll_back: list[str] = []
    for prediction in predictions:
        result = by_name.get(prediction.name)
        if result is not None and result.verdict == PredictionVerdict.HELD:
            continue
        message = result.message if result else f"prediction {prediction.name!r} not judged"
        if prediction.on_miss == MissAction.RECORD:
            recorded.append(message)
        else:
            roll_back.append(message)
    return recorded, roll_back
