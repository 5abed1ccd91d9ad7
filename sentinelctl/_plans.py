"""The plan commands: `submit` a plan, list or show plans, `watch` one until it ends, and
`approve` or `cancel` it, all through PlanService."""

from __future__ import annotations

import argparse
import asyncio
import pathlib

from google.protobuf import json_format
from sentinel.v1 import plan_pb2, plan_pb2_grpc

from sentinelctl._connection import open_channel
from sentinelctl._values import local_time


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `submit`, `plans`, `plan`, `watch`, `approve` and `cancel`."""
    submit = sub.add_parser("submit", help="submit a plan from a JSON file")
    submit.add_argument("file")
    submit.add_argument("--validate-only", action="store_true", help="verdict only, store nothing")
    submit.set_defaults(func=_submit)
    plans = sub.add_parser("plans", help="list plans")
    plans.add_argument("--phase", help="e.g. executing, awaiting_approval")
    plans.add_argument("--target", help="node id or target key")
    plans.set_defaults(func=_plans)
    for name, func, text in (
        ("plan", _plan, "one plan in full (JSON)"),
        ("watch", _watch, "follow a plan until it ends"),
        ("approve", _approve, "approve a plan awaiting approval"),
        ("cancel", _cancel, "cancel a plan (a running one is rolled back)"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("plan_id")
        if name in ("approve", "cancel"):
            command.add_argument("--reason")
        command.set_defaults(func=func)


def _phase_name(value: int) -> str:
    return plan_pb2.PlanPhase.Name(value).removeprefix("PLAN_PHASE_")  # type: ignore[arg-type]


def _plan_line(plan: plan_pb2.Plan) -> str:
    when = local_time(plan.create_time, "%Y-%m-%d %H:%M:%S")
    actions = ",".join(step.action for step in plan.steps)
    return f"{plan.plan_id:<36} {_phase_name(plan.phase):<18} {when}  {plan.source:<12} {actions}"


def _transition_line(t: plan_pb2.PlanTransition) -> str:
    when = local_time(t.time, "%H:%M:%S")
    moved = f"{_phase_name(t.from_phase)} -> {_phase_name(t.to_phase)}"
    return f"{when}  {moved}  ({t.actor}) {t.reason}"


async def _submit(args: argparse.Namespace) -> None:
    text = await asyncio.to_thread(pathlib.Path(args.file).read_text)
    plan = json_format.Parse(text, plan_pb2.Plan())
    async with open_channel(args) as channel:
        response = await plan_pb2_grpc.PlanServiceStub(channel).SubmitPlan(
            plan_pb2.SubmitPlanRequest(plan=plan, validate_only=args.validate_only), timeout=30
        )
    result = response.plan
    label = "would be" if args.validate_only else "is"
    print(f"plan {result.plan_id or '(not stored)'} {label} {_phase_name(result.phase)}")
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


async def _plans(args: argparse.Namespace) -> None:
    request = plan_pb2.ListPlansRequest(target=args.target or "", page_size=500)
    if args.phase:
        request.phase = plan_pb2.PlanPhase.Value(f"PLAN_PHASE_{args.phase.upper()}")
    async with open_channel(args) as channel:
        stub = plan_pb2_grpc.PlanServiceStub(channel)
        print(f"{'PLAN':<36} {'PHASE':<18} {'CREATED':<20} {'SOURCE':<12} STEPS")
        while True:
            response = await stub.ListPlans(request, timeout=10)
            for plan in response.plans:
                print(_plan_line(plan))
            request.page_token = response.next_page_token
            if not request.page_token:
                break


async def _plan(args: argparse.Namespace) -> None:
    async with open_channel(args) as channel:
        response = await plan_pb2_grpc.PlanServiceStub(channel).GetPlan(
            plan_pb2.GetPlanRequest(plan_id=args.plan_id), timeout=10
        )
    print(json_format.MessageToJson(response.plan, preserving_proto_field_name=True))


async def _watch(args: argparse.Namespace) -> None:
    async with open_channel(args) as channel:
        stub = plan_pb2_grpc.PlanServiceStub(channel)
        first = True
        async for event in stub.WatchPlan(plan_pb2.WatchPlanRequest(plan_id=args.plan_id)):
            if first:
                # The stream opens with the plan as it is: show how it got there.
                first = False
                for transition in event.plan.transitions:
                    print(_transition_line(transition), flush=True)
            if event.HasField("transition"):
                print(_transition_line(event.transition), flush=True)
            else:
                for step in event.plan.steps:
                    state = plan_pb2.StepState.Name(step.state).removeprefix("STEP_STATE_")
                    print(
                        f"  step {step.step_id} {step.action}: {state} {step.message}", flush=True
                    )
        print("plan finished")


async def _approve(args: argparse.Namespace) -> None:
    async with open_channel(args) as channel:
        response = await plan_pb2_grpc.PlanServiceStub(channel).ApprovePlan(
            plan_pb2.ApprovePlanRequest(plan_id=args.plan_id, reason=args.reason or ""), timeout=10
        )
    print(f"plan {response.plan.plan_id} is {_phase_name(response.plan.phase)}")


async def _cancel(args: argparse.Namespace) -> None:
    async with open_channel(args) as channel:
        response = await plan_pb2_grpc.PlanServiceStub(channel).CancelPlan(
            plan_pb2.CancelPlanRequest(plan_id=args.plan_id, reason=args.reason or ""), timeout=10
        )
    plan = response.plan
    print(f"plan {plan.plan_id} is {_phase_name(plan.phase)} {plan.status_message}".rstrip())
