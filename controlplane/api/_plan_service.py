"""PlanService: translates plans between protobuf and the domain and maps domain errors to
status codes. Every bad field of a submitted plan is reported at once, with its path."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from sentinel.v1 import plan_pb2, plan_pb2_grpc

from controlplane.analysis import DEFAULT_CONSECUTIVE_ERROR_LIMIT, PrometheusGate
from controlplane.api._errors import abort
from controlplane.api._paging import PageError, decode_token, encode_token, page_size
from controlplane.auth import current_principal
from controlplane.plans import (
    SUMMARY_METRICS,
    Aggregation,
    HealthGate,
    KubernetesObject,
    Limits,
    MetricSummary,
    MissAction,
    Phase,
    Plan,
    PlanConflict,
    PlanDesk,
    PlanFilter,
    PlanInvalid,
    PlanNotFound,
    PlanStateError,
    Precondition,
    PreconditionFailed,
    Prediction,
    PredictionResult,
    RequestIdReused,
    SelfApproval,
    Step,
    StepState,
    Target,
    Transition,
    outcome_time_to_effect,
)

_PHASE_PREFIX = "PLAN_PHASE_"
_STEP_PREFIX = "STEP_STATE_"


def _timestamp(value: dt.datetime | None, into: Any) -> None:
    if value is not None:
        into.FromDatetime(value)


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


def plan_to_proto(plan: Plan) -> plan_pb2.Plan:
    message = plan_pb2.Plan(
        plan_id=plan.plan_id,
        request_id=plan.request_id,
        source=plan.source,
        rationale=plan.rationale,
        confidence=plan.confidence,
        phase=plan_pb2.PlanPhase.Value(_PHASE_PREFIX + plan.phase.value),
        submitted_by=plan.submitted_by,
        status_message=plan.status_message,
    )
    _timestamp(plan.expire_at, message.expire_time)
    _timestamp(plan.created_at, message.create_time)
    _timestamp(plan.updated_at, message.update_time)
    for step in plan.steps:
        out = message.steps.add(
            step_id=step.step_id,
            action=step.action,
            state=plan_pb2.StepState.Value(_STEP_PREFIX + step.state.value),
            message=step.message,
        )
        for target in step.targets:
            if target.kubernetes is not None:
                k = target.kubernetes
                out.targets.add().kubernetes.CopyFrom(
                    plan_pb2.KubernetesObject(
                        cluster=k.cluster, namespace=k.namespace, kind=k.kind, name=k.name
                    )
                )
            else:
                out.targets.add(node_id=target.node_id)
        out.parameters.CopyFrom(_struct(step.parameters))
        out.timeout.FromTimedelta(dt.timedelta(seconds=step.timeout_s))
        for result in step.node_results:
            node = out.node_results.add(
                node_id=result.node_id,
                state=plan_pb2.StepState.Value(_STEP_PREFIX + result.state.value),
                command_id=result.command_id,
                outcome=result.outcome,
                message=result.message,
                rollback_command_id=result.rollback_command_id,
                rollback_outcome=result.rollback_outcome,
            )
            node.output.CopyFrom(_struct(result.output))
    for gate in plan.health_gates:
        out_gate = message.health_gates.add(name=gate.name, expression=gate.expression)
        out_gate.window.FromTimedelta(dt.timedelta(seconds=gate.window_s))
        if gate.prometheus is not None:
            _prometheus_to_proto(gate.prometheus, out_gate.prometheus)
            out_gate.on_inconclusive = (
                plan_pb2.INCONCLUSIVE_ACTION_PAUSE
                if gate.pause_on_inconclusive
                else plan_pb2.INCONCLUSIVE_ACTION_ROLLBACK
            )
            out_gate.pause_timeout.FromTimedelta(dt.timedelta(seconds=gate.pause_timeout_s))
    for record in plan.measurements:
        measured = message.measurements.add(
            gate=record.gate,
            step_index=record.step_index,
            target=record.target,
            point=record.point,
            query=record.query,
            condition=record.condition,
            verdict=record.verdict,
            message=record.message,
        )
        measured.value.CopyFrom(json_format.ParseDict(record.value, struct_pb2.Value()))
        measured.start_time.FromDatetime(dt.datetime.fromisoformat(record.started_at))
        measured.end_time.FromDatetime(dt.datetime.fromisoformat(record.finished_at))
    message.limits.max_nodes_in_parallel = plan.limits.max_nodes_in_parallel
    message.limits.max_replicas_in_parallel = plan.limits.max_replicas_in_parallel
    if plan.limits.deadline_s:
        message.limits.deadline.FromTimedelta(dt.timedelta(seconds=plan.limits.deadline_s))
    for transition in plan.transitions:
        message.transitions.append(transition_to_proto(transition))
    for violation in plan.violations:
        message.violations.add(
            rule_id=violation.rule_id, message=violation.message, field=violation.field
        )
    for precondition in plan.preconditions:
        message.preconditions.add(name=precondition.name, expression=precondition.expression)
    message.allow_drift.extend(plan.allow_drift)
    for state in plan.recorded_state.values():
        recorded = message.recorded_state.add(target=state.target)
        recorded.fields.update(state.fields)
        recorded.observe_time.FromDatetime(dt.datetime.fromisoformat(state.observed_at))
    for prediction in plan.predictions:
        out_prediction = message.predictions.add(
            name=prediction.name,
            metric=prediction.metric,
            aggregation=plan_pb2.PredictionAggregation.Value(
                "PREDICTION_AGGREGATION_" + prediction.aggregation.value
            ),
            expression=prediction.expression,
            on_miss=plan_pb2.PredictionMissAction.Value(
                "PREDICTION_MISS_ACTION_" + prediction.on_miss.value
            ),
            confidence=prediction.confidence,
        )
        out_prediction.window.FromTimedelta(dt.timedelta(seconds=prediction.window_s))
    for verdict in plan.prediction_results:
        message.prediction_results.append(prediction_result_to_proto(verdict))
    message.waiting_reason = plan.waiting_reason
    return message


def prediction_result_to_proto(result: PredictionResult) -> plan_pb2.PredictionResult:
    message = plan_pb2.PredictionResult(
        name=result.name,
        verdict=plan_pb2.PredictionVerdict.Value("PREDICTION_VERDICT_" + result.verdict.value),
        message=result.message,
        samples=result.samples,
        confidence=result.confidence,
    )
    if result.observed is not None and math.isfinite(result.observed):
        message.observed = result.observed
    if result.time_to_effect_s is not None:
        message.time_to_effect.FromTimedelta(dt.timedelta(seconds=result.time_to_effect_s))
    message.check_time.FromDatetime(dt.datetime.fromisoformat(result.checked_at))
    return message


def _summary_to_proto(summary: MetricSummary, into: plan_pb2.MetricSummary) -> None:
    into.mean, into.p95, into.min, into.max = summary.mean, summary.p95, summary.min, summary.max
    into.count = summary.count
    into.start_time.FromDatetime(dt.datetime.fromisoformat(summary.start))
    into.end_time.FromDatetime(dt.datetime.fromisoformat(summary.end))


def plan_outcome_to_proto(plan: Plan) -> plan_pb2.PlanOutcome:
    """What the plan did: per target its telemetry before the first step and after the last,
    the prediction verdicts and the time to effect."""
    message = plan_pb2.PlanOutcome(
        plan_id=plan.plan_id, phase=plan_pb2.PlanPhase.Value(_PHASE_PREFIX + plan.phase.value)
    )
    targets = list(dict.fromkeys([*plan.telemetry_before, *plan.telemetry_after]))
    for target in targets:
        before = plan.telemetry_before.get(target, {})
        after = plan.telemetry_after.get(target, {})
        out = message.targets.add(target=target)
        known = [m for m in SUMMARY_METRICS if m in before or m in after]
        for metric in [*known, *sorted({*before, *after} - set(known))]:
            change = out.metrics.add(metric=metric)
            if metric in before:
                _summary_to_proto(before[metric], change.before)
            if metric in after:
                _summary_to_proto(after[metric], change.after)
    for result in plan.prediction_results:
        message.predictions.append(prediction_result_to_proto(result))
    _timestamp(plan.started_at, message.start_time)
    _timestamp(plan.steps_finished_at, message.end_time)
    time_to_effect = outcome_time_to_effect(plan.predictions, plan.prediction_results)
    if time_to_effect is not None:
        message.time_to_effect.FromTimedelta(dt.timedelta(seconds=time_to_effect))
    return message


def _prometheus_to_proto(gate: PrometheusGate, out: plan_pb2.PrometheusQuery) -> None:
    out.address = gate.address
    out.query = gate.query
    out.success_condition = gate.success_condition
    out.failure_condition = gate.failure_condition
    out.interval.FromTimedelta(dt.timedelta(seconds=gate.interval_s))
    out.count = gate.count
    out.failure_limit = gate.failure_limit
    out.inconclusive_limit = gate.inconclusive_limit
    out.consecutive_error_limit = gate.consecutive_error_limit
    out.timeout.FromTimedelta(dt.timedelta(seconds=gate.timeout_s))


def _prometheus_from_proto(name: str, query: plan_pb2.PrometheusQuery) -> PrometheusGate:
    return PrometheusGate(
        name=name,
        address=query.address,
        query=query.query,
        success_condition=query.success_condition,
        failure_condition=query.failure_condition,
        interval_s=_seconds(query.interval) if query.HasField("interval") else 60.0,
        count=query.count or 1,
        failure_limit=query.failure_limit,
        inconclusive_limit=query.inconclusive_limit,
        consecutive_error_limit=(query.consecutive_error_limit or DEFAULT_CONSECUTIVE_ERROR_LIMIT),
        timeout_s=_seconds(query.timeout) if query.HasField("timeout") else 10.0,
    )


def transition_to_proto(transition: Transition) -> plan_pb2.PlanTransition:
    message = plan_pb2.PlanTransition(
        from_phase=plan_pb2.PlanPhase.Value(_PHASE_PREFIX + transition.from_phase.value),
        to_phase=plan_pb2.PlanPhase.Value(_PHASE_PREFIX + transition.to_phase.value),
        actor=transition.actor,
        reason=transition.reason,
    )
    message.time.FromDatetime(transition.at)
    return message


def _seconds(duration: Any) -> float:
    return float(duration.seconds + duration.nanos / 1e9)


def plan_from_proto(
    request: plan_pb2.SubmitPlanRequest, default_timeout_s: float
) -> tuple[Plan, list[tuple[str, str]]]:
    """The domain plan a request describes, and the problems found translating it.

    Output-only fields (plan_id, phase, transitions, violations, times, submitted_by, step
    state and results) are ignored, as the API design guide asks.
    """
    problems: list[tuple[str, str]] = []
    source = request.plan
    request_id = request.request_id or source.request_id
    if request.request_id and source.request_id and request.request_id != source.request_id:
        problems.append(
            ("plan.request_id", "differs from request_id; set one of them, or both the same")
        )
    expire_at = None
    if source.HasField("expire_time"):
        try:
            expire_at = source.expire_time.ToDatetime(tzinfo=dt.UTC)
        except (ValueError, OverflowError) as exc:
            problems.append(("plan.expire_time", f"not a valid time: {exc}"))
    steps = []
    for i, step in enumerate(source.steps):
        targets = []
        for j, target in enumerate(step.targets):
            kind = target.WhichOneof("kind")
            if kind == "kubernetes":
                k = target.kubernetes
                targets.append(
                    Target(kubernetes=KubernetesObject(k.cluster, k.namespace, k.kind, k.name))
                )
            elif kind == "node_id":
                targets.append(Target(node_id=target.node_id))
            else:
                problems.append((f"plan.steps[{i}].targets[{j}]", "set node_id or kubernetes"))
        timeout_s = default_timeout_s
        if step.HasField("timeout"):
            timeout_s = _seconds(step.timeout)
        try:
            parameters = json_format.MessageToDict(step.parameters)
        except ValueError:
            parameters = {}
            problems.append(
                (f"plan.steps[{i}].parameters", "numbers must be finite (no NaN or Infinity)")
            )
        steps.append(
            Step(
                index=i,
                step_id=step.step_id or f"step-{i}",
                action=step.action,
                targets=tuple(targets),
                parameters=parameters,
                timeout_s=timeout_s,
            )
        )
    gates = []
    for gate in source.health_gates:
        window_s = _seconds(gate.window) if gate.HasField("window") else 30.0
        prometheus = (
            _prometheus_from_proto(gate.name, gate.prometheus)
            if gate.HasField("prometheus")
            else None
        )
        pause_timeout_s = _seconds(gate.pause_timeout) if gate.HasField("pause_timeout") else 3600.0
        gates.append(
            HealthGate(
                gate.name,
                gate.expression,
                window_s,
                prometheus,
                pause_on_inconclusive=gate.on_inconclusive == plan_pb2.INCONCLUSIVE_ACTION_PAUSE,
                pause_timeout_s=pause_timeout_s,
            )
        )
    limits = Limits(
        max_nodes_in_parallel=source.limits.max_nodes_in_parallel or 1,
        max_replicas_in_parallel=source.limits.max_replicas_in_parallel,
        deadline_s=_seconds(source.limits.deadline) if source.limits.HasField("deadline") else 0.0,
    )
    predictions = []
    for i, prediction in enumerate(source.predictions):
        at = f"plan.predictions[{i}]"
        if prediction.aggregation not in plan_pb2.PredictionAggregation.values():
            problems.append((f"{at}.aggregation", f"unknown value {prediction.aggregation}"))
        if prediction.on_miss not in plan_pb2.PredictionMissAction.values():
            problems.append((f"{at}.on_miss", f"unknown value {prediction.on_miss}"))
        aggregation = Aggregation.MEAN
        if prediction.aggregation in plan_pb2.PredictionAggregation.values() and (
            prediction.aggregation != plan_pb2.PREDICTION_AGGREGATION_UNSPECIFIED
        ):
            aggregation = Aggregation(
                plan_pb2.PredictionAggregation.Name(prediction.aggregation).removeprefix(
                    "PREDICTION_AGGREGATION_"
                )
            )
        on_miss = (
            MissAction.RECORD
            if prediction.on_miss == plan_pb2.PREDICTION_MISS_ACTION_RECORD
            else MissAction.ROLLBACK
        )
        if math.isnan(prediction.confidence):
            problems.append((f"{at}.confidence", "must be a number within [0, 1], got NaN"))
        predictions.append(
            Prediction(
                name=prediction.name,
                metric=prediction.metric,
                aggregation=aggregation,
                expression=prediction.expression,
                window_s=_seconds(prediction.window) if prediction.HasField("window") else 60.0,
                on_miss=on_miss,
                confidence=0.0 if math.isnan(prediction.confidence) else prediction.confidence,
            )
        )
    confidence = source.confidence
    if math.isnan(confidence):
        problems.append(("plan.confidence", "must be a number within [0, 1], got NaN"))
        confidence = 0.0
    plan = Plan(
        plan_id="",
        request_id=request_id or f"auto-{uuid.uuid4().hex}",
        source=source.source,
        rationale=source.rationale,
        confidence=confidence,
        expire_at=expire_at,
        steps=steps,
        health_gates=tuple(gates),
        limits=limits,
        preconditions=tuple(Precondition(p.name, p.expression) for p in source.preconditions),
        allow_drift=tuple(source.allow_drift),
        predictions=tuple(predictions),
    )
    return plan, problems


def _invalid_message(problems: list[tuple[str, str]]) -> str:
    shown = problems[:50]
    more = f"; and {len(problems) - 50} more" if len(problems) > 50 else ""
    return "; ".join(f"{path}: {message}" for path, message in shown) + more


def _phase_filter(value: int) -> Phase | None:
    if value == plan_pb2.PLAN_PHASE_UNSPECIFIED:
        return None
    name = plan_pb2.PlanPhase.Name(plan_pb2.PlanPhase.ValueType(value))
    return Phase(name.removeprefix(_PHASE_PREFIX))


class PlanService(plan_pb2_grpc.PlanServiceServicer):
    """The gRPC face of the plan desk: translates plan messages and maps errors to status codes."""

    def __init__(self, plans: PlanDesk, default_step_timeout_s: float) -> None:
        self._plans = plans
        self._default_timeout_s = default_step_timeout_s

    async def SubmitPlan(
        self, request: plan_pb2.SubmitPlanRequest, context: grpc.aio.ServicerContext
    ) -> plan_pb2.SubmitPlanResponse:
        if not request.HasField("plan"):
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "plan: required")
        draft, problems = plan_from_proto(request, self._default_timeout_s)
        if problems:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, _invalid_message(problems))
        principal = current_principal().spiffe_id
        try:
            submission = await self._plans.submit(
                draft, principal, validate_only=request.validate_only
            )
        except PlanInvalid as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, _invalid_message(exc.problems))
        except PreconditionFailed as exc:
            await abort(
                context, grpc.StatusCode.FAILED_PRECONDITION, _invalid_message(exc.problems)
            )
        except RequestIdReused as exc:
            await abort(context, grpc.StatusCode.ALREADY_EXISTS, str(exc))
        response = plan_pb2.SubmitPlanResponse(
            plan=plan_to_proto(submission.plan), replayed=submission.replayed
        )
        for command in submission.preview:
            planned = response.preview.add(
                step_index=command.step_index,
                step_id=command.step_id,
                action=command.action,
                node_id=command.node_id,
                wave=command.wave,
                summary=command.summary,
                dry_run_error=command.dry_run_error,
            )
            for change in command.changes:
                planned.changes.add(field=change.field, before=change.before, after=change.after)
        return response

    async def _get(self, plan_id: str, context: grpc.aio.ServicerContext) -> Plan:
        if not plan_id:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "plan_id: required")
        if len(plan_id) > 64 or not plan_id.isprintable():
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "plan_id: not a plan id (at most 64 printable characters)",
            )
        try:
            return await self._plans.get(plan_id)
        except PlanNotFound:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"plan_id: no plan {plan_id!r}")

    async def GetPlan(
        self, request: plan_pb2.GetPlanRequest, context: grpc.aio.ServicerContext
    ) -> plan_pb2.GetPlanResponse:
        plan = await self._get(request.plan_id, context)
        return plan_pb2.GetPlanResponse(plan=plan_to_proto(plan))

    async def ListPlans(
        self, request: plan_pb2.ListPlansRequest, context: grpc.aio.ServicerContext
    ) -> plan_pb2.ListPlansResponse:
        try:
            size = page_size(request.page_size)
            after = decode_token(request.page_token)
        except PageError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request.phase not in plan_pb2.PlanPhase.values():
            await abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"phase: unknown value {request.phase}"
            )
        for name in ("source", "target"):
            value = getattr(request, name)
            if len(value) > 512 or "\x00" in value:
                await abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{name}: at most 512 characters, no NUL",
                )
        target = request.target
        if target and "/" not in target:
            target = f"node/{target}"  # a bare name is a node id
        where = PlanFilter(_phase_filter(request.phase), request.source, target)
        plans = await self._plans.list(where, after, size + 1)
        token = encode_token(plans[size - 1].plan_id) if len(plans) > size else ""
        return plan_pb2.ListPlansResponse(
            plans=[plan_to_proto(p) for p in plans[:size]], next_page_token=token
        )

    async def WatchPlan(
        self, request: plan_pb2.WatchPlanRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[plan_pb2.WatchPlanResponse]:
        await self._get(request.plan_id, context)  # NOT_FOUND before the stream starts
        async for plan, transition in self._plans.watch(request.plan_id):
            response = plan_pb2.WatchPlanResponse(plan=plan_to_proto(plan))
            if transition is not None:
                response.transition.CopyFrom(transition_to_proto(transition))
            # The final message: the plan is terminal and this is its last transition.
            if plan.phase.terminal and (transition is None or transition is plan.transitions[-1]):
                response.outcome.CopyFrom(plan_outcome_to_proto(plan))
            yield response

    async def _operator_action(
        self,
        plan_id: str,
        context: grpc.aio.ServicerContext,
        action: Callable[[str, str], Awaitable[Plan]],
    ) -> plan_pb2.Plan:
        """Approve or cancel, by the caller, with the domain's refusals as status codes."""
        await self._get(plan_id, context)
        try:
            plan = await action(plan_id, current_principal().spiffe_id)
        except SelfApproval as exc:
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except PlanStateError as exc:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except PreconditionFailed as exc:  # approval judged on the state now
            await abort(
                context, grpc.StatusCode.FAILED_PRECONDITION, _invalid_message(exc.problems)
            )
        except PlanConflict as exc:
            await abort(context, grpc.StatusCode.ABORTED, str(exc))
        return plan_to_proto(plan)

    async def ApprovePlan(
        self, request: plan_pb2.ApprovePlanRequest, context: grpc.aio.ServicerContext
    ) -> plan_pb2.ApprovePlanResponse:
        plan = await self._operator_action(
            request.plan_id,
            context,
            lambda plan_id, who: self._plans.approve(plan_id, who, request.reason),
        )
        return plan_pb2.ApprovePlanResponse(plan=plan)

    async def CancelPlan(
        self, request: plan_pb2.CancelPlanRequest, context: grpc.aio.ServicerContext
    ) -> plan_pb2.CancelPlanResponse:
        plan = await self._operator_action(
            request.plan_id,
            context,
            lambda plan_id, who: self._plans.cancel(plan_id, who, request.reason),
        )
        return plan_pb2.CancelPlanResponse(plan=plan)

    async def GetPlanOutcome(
        self, request: plan_pb2.GetPlanOutcomeRequest, context: grpc.aio.ServicerContext
    ) -> plan_pb2.GetPlanOutcomeResponse:
        plan = await self._get(request.plan_id, context)
        return plan_pb2.GetPlanOutcomeResponse(outcome=plan_outcome_to_proto(plan))


__all__ = ["PlanService", "StepState", "plan_from_proto", "plan_to_proto"]
