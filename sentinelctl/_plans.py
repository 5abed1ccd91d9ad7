"""The plan commands: submit or validate a plan from a YAML or JSON file, list or show plans,
`watch` one step by step until it ends, and `approve` or `cancel` it, all through
PlanService."""

from __future__ import annotations

import argparse
import json

from google.protobuf import json_format, timestamp_pb2
from sentinel.v1 import plan_pb2

from sentinelclient import PlanUpdate, SentinelClient, load_plan
from sentinelctl._output import (
    add_output_argument,
    message_data,
    print_data,
    print_messages,
    print_streamed,
    table,
)
from sentinelctl._values import local_time, seconds

PLAN_COMMANDS = ("get", "outcome", "submit", "validate")
"""Subcommands of `plan`; any other word after `plan` is a plan id (`plan ID` = `plan get ID`)."""

_PHASES = [
    plan_pb2.PlanPhase.Name(value).removeprefix("PLAN_PHASE_").lower()
    for value in plan_pb2.PlanPhase.values()
    if value != plan_pb2.PLAN_PHASE_UNSPECIFIED
]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `submit`, `plans`, `plan get|outcome|submit|validate`, `watch`, `approve` and
    `cancel`."""
    submit = sub.add_parser("submit", help="submit a plan from a YAML or JSON file")
    submit.add_argument("file")
    submit.add_argument("--validate-only", action="store_true", help="verdict only, store nothing")
    submit.set_defaults(func=_submit_legacy)
    plans = sub.add_parser("plans", help="list plans")
    plans.add_argument("--phase", choices=_PHASES, help="e.g. executing, awaiting_approval")
    plans.add_argument("--target", help="node id or target key")
    add_output_argument(plans)
    plans.set_defaults(func=_plans)

    plan = sub.add_parser(
        "plan", help="one plan: get (`plan ID` for short), outcome, submit, validate"
    )
    plan_sub = plan.add_subparsers(dest="plan_command", required=True)
    get = plan_sub.add_parser("get", help="one plan in full (JSON unless -o says otherwise)")
    get.add_argument("plan_id")
    add_output_argument(get, default="json")
    get.set_defaults(func=_get)
    outcome = plan_sub.add_parser(
        "outcome", help="what a plan did: telemetry before and after, prediction verdicts"
    )
    outcome.add_argument("plan_id")
    add_output_argument(outcome)
    outcome.set_defaults(func=_outcome)
    plan_submit = plan_sub.add_parser("submit", help="submit a plan file (YAML or JSON)")
    plan_submit.add_argument("-f", "--file", required=True, help="plan file; - reads stdin")
    plan_submit.add_argument(
        "--request-id", help="idempotency key (default: the file's, else a new one)"
    )
    plan_submit.set_defaults(func=_plan_submit)
    validate = plan_sub.add_parser(
        "validate", help="verdict, preview and dry-run changes of a plan file; stores nothing"
    )
    validate.add_argument("-f", "--file", required=True, help="plan file; - reads stdin")
    add_output_argument(validate)
    validate.set_defaults(func=_plan_validate)

    watch = sub.add_parser("watch", help="follow a plan step by step until it ends")
    watch.add_argument("plan_id")
    add_output_argument(watch)
    watch.set_defaults(func=_watch)
    for name, func, text in (
        ("approve", _approve, "approve a plan awaiting approval"),
        ("cancel", _cancel, "cancel a plan (a running one is rolled back)"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("plan_id")
        command.add_argument("--reason")
        command.set_defaults(func=func)


def _phase_name(value: int) -> str:
    return plan_pb2.PlanPhase.Name(value).removeprefix("PLAN_PHASE_")  # type: ignore[arg-type]


def _state_name(value: int) -> str:
    return plan_pb2.StepState.Name(value).removeprefix("STEP_STATE_")  # type: ignore[arg-type]


def _plan_line(plan: plan_pb2.Plan) -> str:
    when = local_time(plan.create_time, "%Y-%m-%d %H:%M:%S")
    actions = ",".join(step.action for step in plan.steps)
    return f"{plan.plan_id:<36} {_phase_name(plan.phase):<18} {when}  {plan.source:<12} {actions}"


def _transition_line(t: plan_pb2.PlanTransition) -> str:
    when = local_time(t.time, "%H:%M:%S")
    moved = f"{_phase_name(t.from_phase)} -> {_phase_name(t.to_phase)}"
    return f"{when}  {moved}  ({t.actor}) {t.reason}"


def _target_name(target: plan_pb2.Target) -> str:
    if target.HasField("kubernetes"):
        k = target.kubernetes
        return f"{k.cluster}/{k.namespace}/{k.kind}/{k.name}"
    return target.node_id


def _print_submission(response: plan_pb2.SubmitPlanResponse, validate_only: bool) -> None:
    result = response.plan
    label = "would be" if validate_only else "is"
    replayed = " (replayed: submitted before with this request id)" if response.replayed else ""
    print(f"plan {result.plan_id or '(not stored)'} {label} {_phase_name(result.phase)}{replayed}")
    for violation in result.violations:
        print(f"  {violation.rule_id}: {violation.message} [{violation.field}]")
    for command in response.preview:
        # Servers before PlannedCommand.summary leave it empty.
        what = command.summary or f"{command.action} on {command.node_id}"
        print(f"  step {command.step_index} wave {command.wave}: {what}")
        for change in command.changes:
            print(f"      {change.field}: {change.before} -> {change.after}")
        if command.dry_run_error:
            print(f"      dry run failed: {command.dry_run_error}")


def _submit_legacy(args: argparse.Namespace, client: SentinelClient) -> None:
    plan = load_plan(args.file)
    if args.validate_only:
        _print_submission(client.validate_plan(plan), validate_only=True)
    else:
        _print_submission(client.submit_plan(plan), validate_only=False)


def _plan_submit(args: argparse.Namespace, client: SentinelClient) -> None:
    response = client.submit_plan(load_plan(args.file), request_id=args.request_id)
    _print_submission(response, validate_only=False)


def _plan_validate(args: argparse.Namespace, client: SentinelClient) -> None:
    response = client.validate_plan(load_plan(args.file))
    if args.output != "table":
        print_data(message_data(response), args.output)
        return
    for line in validation_table(response):
        print(line)


def validation_table(response: plan_pb2.SubmitPlanResponse) -> list[str]:
    """The verdict, the violations, every command the plan would send and what a dry run says
    each would change, as tables."""
    lines = [f"verdict: the plan would be {_phase_name(response.plan.phase)}"]
    violations = response.plan.violations
    if violations:
        lines += ["", "VIOLATIONS"]
        lines += table(
            ("RULE", "FIELD", "MESSAGE"), [(v.rule_id, v.field, v.message) for v in violations]
        )
    lines += ["", "COMMANDS"]
    rows = []
    for command in response.preview:
        what = command.summary or f"{command.action} on {command.node_id}"
        dry_run = "failed" if command.dry_run_error else f"{len(command.changes)} change(s)"
        rows.append((command.step_index, command.step_id, command.wave, what, dry_run))
    if rows:
        lines += table(("STEP", "ID", "WAVE", "SUMMARY", "DRY RUN"), rows)
    else:
        lines.append("(no commands)")
    changes = [
        (command.step_index, command.node_id or command.step_id, c.field, c.before, c.after)
        for command in response.preview
        for c in command.changes
    ]
    if changes:
        lines += ["", "CHANGES"]
        lines += table(("STEP", "TARGET", "FIELD", "BEFORE", "AFTER"), changes)
    errors = [
        (c.step_index, c.step_id, c.dry_run_error) for c in response.preview if c.dry_run_error
    ]
    if errors:
        lines += ["", "DRY RUN ERRORS"]
        lines += table(("STEP", "ID", "ERROR"), errors)
    return lines


def _plans(args: argparse.Namespace, client: SentinelClient) -> None:
    phase = plan_pb2.PlanPhase.Value(f"PLAN_PHASE_{args.phase.upper()}") if args.phase else None
    plans = client.list_plans(phase=phase, target=args.target or "", page_size=500)
    if args.output != "table":
        print_messages(plans, args.output)
        return
    print(f"{'PLAN':<36} {'PHASE':<18} {'CREATED':<20} {'SOURCE':<12} STEPS")
    for plan in plans:
        print(_plan_line(plan))


def _get(args: argparse.Namespace, client: SentinelClient) -> None:
    plan = client.get_plan(args.plan_id)
    if args.output == "table":
        for line in plan_summary(plan):
            print(line)
    else:
        print_data(message_data(plan), args.output)


def plan_summary(plan: plan_pb2.Plan) -> list[str]:
    """A plan for people: header, steps with their targets' results, gates, transitions."""
    lines = [
        f"plan        {plan.plan_id}  {_phase_name(plan.phase)}",
        f"source      {plan.source}  confidence {plan.confidence:g}  by {plan.submitted_by}",
    ]
    if plan.rationale:
        lines.append(f"rationale   {plan.rationale}")
    if plan.status_message:
        lines.append(f"status      {plan.status_message}")
    lines += ["", "STEPS"]
    rows = []
    for i, step in enumerate(plan.steps):
        targets = ",".join(_target_name(t) for t in step.targets)
        rows.append((i, step.step_id, step.action, _state_name(step.state), targets, step.message))
    lines += table(("#", "ID", "ACTION", "STATE", "TARGETS", "MESSAGE"), rows)
    if plan.health_gates:
        lines += ["", "GATES"]
        lines += table(("NAME", "KIND", "CHECK"), [_gate_row(g) for g in plan.health_gates])
    if plan.measurements:
        lines += ["", "MEASUREMENTS"]
        lines += table(
            ("GATE", "STEP", "TARGET", "POINT", "VERDICT", "VALUE"),
            [
                (m.gate, m.step_index, m.target, m.point, m.verdict, _value(m))
                for m in plan.measurements
            ],
        )
    lines += ["", "TRANSITIONS"]
    lines += [_transition_line(t) for t in plan.transitions]
    return lines


def _outcome(args: argparse.Namespace, client: SentinelClient) -> None:
    outcome = client.get_plan_outcome(args.plan_id)
    if args.output == "table":
        for line in outcome_summary(outcome):
            print(line)
    else:
        print_data(message_data(outcome), args.output)


def _when(ts: timestamp_pb2.Timestamp, present: bool) -> str:
    return local_time(ts, "%Y-%m-%d %H:%M:%S") if present else "-"


def outcome_summary(outcome: plan_pb2.PlanOutcome) -> list[str]:
    """A plan's outcome for people: when it ran, each target's metrics before its first step
    and after its last, and each prediction's verdict."""
    started = _when(outcome.start_time, outcome.HasField("start_time"))
    ended = _when(outcome.end_time, outcome.HasField("end_time"))
    effect = seconds(outcome.time_to_effect) if outcome.HasField("time_to_effect") else "-"
    lines = [
        f"plan            {outcome.plan_id}  {_phase_name(outcome.phase)}",
        f"ran             {started} .. {ended}",
        f"time to effect  {effect}",
        "",
        "TARGETS",
    ]
    rows = [
        (
            target.target,
            change.metric,
            *_summary_cells(change.before),
            *_summary_cells(change.after),
        )
        for target in outcome.targets
        for change in target.metrics
    ]
    # A target without metrics still shows: the plan touched it, no telemetry was kept.
    rows += [(t.target, "-", "-", "-", 0, "-", "-", 0) for t in outcome.targets if not t.metrics]
    if rows:
        headers = ("TARGET", "METRIC", "BEFORE MEAN", "BEFORE P95", "BEFORE N")
        lines += table((*headers, "AFTER MEAN", "AFTER P95", "AFTER N"), rows)
    else:
        lines.append("(no targets)")
    lines += ["", "PREDICTIONS"]
    if outcome.predictions:
        lines += table(
            ("NAME", "VERDICT", "OBSERVED", "TIME TO EFFECT", "MESSAGE"),
            [_prediction_row(p) for p in outcome.predictions],
        )
    else:
        lines.append("(the plan stated none)")
    return lines


def _summary_cells(summary: plan_pb2.MetricSummary) -> tuple[str, str, int]:
    # No values in the window: a mean of 0 would read as a measurement.
    if not summary.count:
        return "-", "-", 0
    return f"{summary.mean:.1f}", f"{summary.p95:.1f}", summary.count


def _prediction_row(prediction: plan_pb2.PredictionResult) -> tuple[str, str, str, str, str]:
    verdict = plan_pb2.PredictionVerdict.Name(prediction.verdict).removeprefix(
        "PREDICTION_VERDICT_"
    )
    observed = f"{prediction.observed:g}" if prediction.HasField("observed") else "-"
    effect = seconds(prediction.time_to_effect) if prediction.HasField("time_to_effect") else "-"
    return prediction.name, verdict, observed, effect, prediction.message


def _gate_row(gate: plan_pb2.HealthGate) -> tuple[str, str, str]:
    if gate.HasField("prometheus"):
        return gate.name, "prometheus", gate.prometheus.query
    return gate.name, "telemetry", gate.expression


def _value(measurement: plan_pb2.AnalysisMeasurement) -> str:
    return json.dumps(json_format.MessageToDict(measurement.value))


class WatchPrinter:
    """Prints what changed in a watched plan since the last update: transitions, each step's
    state and per-target results, and every new gate measurement."""

    def __init__(self) -> None:
        self._steps: dict[int, tuple[int, str]] = {}
        self._results: dict[tuple[int, str], tuple[str, str, str]] = {}
        self._measurements = 0

    def lines(self, update: PlanUpdate, first: bool) -> list[str]:
        plan = update.plan
        out: list[str] = []
        if first:
            # The stream opens with the plan as it is: show how it got there.
            out += [_transition_line(t) for t in plan.transitions]
            for gate in plan.health_gates:
                name, kind, check = _gate_row(gate)
                out.append(f"  gate {name} ({kind}): {check}")
        if update.transition is not None:
            out.append(_transition_line(update.transition))
        for i, step in enumerate(plan.steps):
            seen = (step.state, step.message)
            if self._steps.get(i) != seen and not (first and step.state <= 1):
                done = sum(bool(r.outcome) for r in step.node_results)
                progress = f" [{done}/{len(step.targets)} targets]" if step.targets else ""
                text = f"  step {step.step_id} {step.action}: {_state_name(step.state)}{progress}"
                out.append(f"{text} {step.message}".rstrip())
            self._steps[i] = seen
            for result in step.node_results:
                result_seen = (result.outcome, result.message, result.rollback_outcome)
                if self._results.get((i, result.node_id)) != result_seen:
                    outcome = result.outcome or _state_name(result.state)
                    rollback = (
                        f" (rollback: {result.rollback_outcome})" if result.rollback_outcome else ""
                    )
                    out.append(
                        f"    {result.node_id}: {outcome}{rollback} {result.message}".rstrip()
                    )
                    self._results[(i, result.node_id)] = result_seen
        for m in plan.measurements[self._measurements :]:
            out.append(
                f"  gate {m.gate} step {m.step_index} {m.target} {m.point}: {m.verdict} "
                f"value={_value(m)} {m.message}".rstrip()
            )
        self._measurements = len(plan.measurements)
        if update.terminal and plan.status_message:
            out.append(f"plan {_phase_name(plan.phase)}: {plan.status_message}")
        return out


def _watch(args: argparse.Namespace, client: SentinelClient) -> None:
    printer = WatchPrinter()
    first = True
    for update in client.watch_plan(args.plan_id):
        if args.output != "table":
            response = plan_pb2.WatchPlanResponse(plan=update.plan)
            if update.transition is not None:
                response.transition.CopyFrom(update.transition)
            print_streamed(response, args.output)
            continue
        for line in printer.lines(update, first):
            print(line, flush=True)
        first = False
    if args.output == "table":
        print("plan finished")


def _approve(args: argparse.Namespace, client: SentinelClient) -> None:
    plan = client.approve_plan(args.plan_id, args.reason or "")
    print(f"plan {plan.plan_id} is {_phase_name(plan.phase)}")


def _cancel(args: argparse.Namespace, client: SentinelClient) -> None:
    plan = client.cancel_plan(args.plan_id, args.reason or "")
    print(f"plan {plan.plan_id} is {_phase_name(plan.phase)} {plan.status_message}".rstrip())
