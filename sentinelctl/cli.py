"""`sentinelctl`: the operator's command line for a running control plane.

sentinelctl agents                  list agents and their liveness
sentinelctl agent NODE              one agent in full (JSON)
sentinelctl telemetry [--node N]    latest sample per node, one line each
sentinelctl telemetry --follow      live samples as they arrive
sentinelctl audit [--principal P] [--method M] [--target T] [--limit N]
                                    recent audit events, newest first
sentinelctl submit FILE [--validate-only]
                                    submit a plan (JSON, the sentinel.v1.Plan message)
sentinelctl plans [--phase P] [--target T]
                                    list plans, oldest first
sentinelctl plan ID                 one plan in full (JSON)
sentinelctl watch ID                follow a plan's transitions until it ends
sentinelctl approve ID [--reason R] / sentinelctl cancel ID [--reason R]
sentinelctl token create --node PATTERN [--uses N] [--ttl 30m]
                                    a bootstrap token for enrolling nodes (printed once)
sentinelctl revoke --serial S | --node N [--reason R]
                                    revoke a certificate or every certificate of a node
sentinelctl revocations             list revocations
sentinelctl user add NAME --role operator|viewer
                                    create a password user (password from a prompt or
                                    SENTINEL_PASSWORD)
sentinelctl user delete NAME / sentinelctl users
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import os
import pathlib
import sys

import grpc
from google.protobuf import duration_pb2, json_format, timestamp_pb2
from sentinel.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    plan_pb2,
    plan_pb2_grpc,
    telemetry_pb2,
    telemetry_pb2_grpc,
)

_STATUS = {
    fleet_pb2.AGENT_STATUS_CONNECTED: "Connected",
    fleet_pb2.AGENT_STATUS_SUSPECT: "Suspect",
    fleet_pb2.AGENT_STATUS_DISCONNECTED: "Disconnected",
}


def _channel(args: argparse.Namespace) -> grpc.aio.Channel:
    directory = pathlib.Path(args.certs_dir)
    credentials = grpc.ssl_channel_credentials(
        (directory / "ca.pem").read_bytes(),
        (directory / f"{args.identity}.key").read_bytes(),
        (directory / f"{args.identity}.pem").read_bytes(),
    )
    return grpc.aio.secure_channel(args.server, credentials)


def _ago(ts: object) -> str:
    seconds = (dt.datetime.now(dt.UTC) - ts.ToDatetime(dt.UTC)).total_seconds()  # type: ignore[attr-defined]
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def _sample_line(sample: telemetry_pb2.TelemetrySample) -> str:
    host = sample.host
    memory = host.memory
    used = 100 * (1 - memory.available_bytes / memory.total_bytes) if memory.total_bytes else 0.0
    gpu_state = telemetry_pb2.GpuCollectionState.Name(sample.gpu_status.state).removeprefix(
        "GPU_COLLECTION_STATE_"
    )
    gpus = f"{len(sample.gpus)} GPU" if sample.gpus else gpu_state.lower().replace("_", " ")
    hottest = max((g.temperature_celsius for g in sample.gpus), default=None)
    if hottest is not None:
        gpus += f", max {hottest}°C"
    when = sample.collect_time.ToDatetime(dt.UTC).astimezone().strftime("%H:%M:%S")
    cpu = host.cpu.utilization_percent
    usage = f"cpu={cpu:5.1f}%  load1={host.load.load1:5.2f}  mem={used:5.1f}%"
    return f"{when}  {sample.node_id:<16} seq={sample.seq:<6} {usage}  gpus: {gpus}"


async def _agents(args: argparse.Namespace) -> None:
    async with _channel(args) as channel:
        stub = fleet_pb2_grpc.FleetServiceStub(channel)
        token = ""
        rows = []
        while True:
            response = await stub.ListAgents(
                fleet_pb2.ListAgentsRequest(page_token=token), timeout=10
            )
            rows.extend(response.agents)
            token = response.next_page_token
            if not token:
                break
    print(
        f"{'NODE':<16} {'STATUS':<13} {'LAST SEEN':<10} {'VERSION':<8} {'GPUS':<5} {'SEQ':<8} HOST"
    )
    for agent in rows:
        status = _STATUS.get(agent.status, "?")
        seen = _ago(agent.last_seen_time)
        host = f"{agent.host.hostname} ({agent.host.logical_cpus} CPUs)"
        print(
            f"{agent.node_id:<16} {status:<13} {seen:<10} {agent.agent_version:<8} "
            f"{len(agent.gpus):<5} {agent.last_telemetry_seq:<8} {host}"
        )
    if not rows:
        print("(no agents registered yet)")


async def _agent(args: argparse.Namespace) -> None:
    async with _channel(args) as channel:
        response = await fleet_pb2_grpc.FleetServiceStub(channel).GetAgent(
            fleet_pb2.GetAgentRequest(node_id=args.node), timeout=10
        )
    print(json_format.MessageToJson(response.agent))


async def _telemetry(args: argparse.Namespace) -> None:
    nodes = [args.node] if args.node else []
    async with _channel(args) as channel:
        stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
        if not args.follow:
            response = await stub.GetFleetTelemetry(
                telemetry_pb2.GetFleetTelemetryRequest(node_ids=nodes), timeout=10
            )
            for sample in response.samples:
                print(_sample_line(sample))
            if not response.samples:
                print("(no telemetry yet)")
            return
        request = telemetry_pb2.StreamTelemetryRequest(node_ids=nodes, include_latest=True)
        async for response in stub.StreamTelemetry(request):
            print(_sample_line(response.sample), flush=True)


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _full_method(method: str) -> str:
    """Accepts "PlanService/CancelPlan" for "/sentinel.v1.PlanService/CancelPlan"."""
    if "/" in method and not method.startswith("/"):
        return f"/sentinel.v1.{method}"
    return method


def _audit_line(event: audit_pb2.AuditEvent) -> str:
    when = event.time.ToDatetime(dt.UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    method = event.method.removeprefix("/sentinel.v1.")
    line = f"{when}  {event.outcome:<18} {method:<30} {event.target:<24} {event.principal}"
    if event.detail:
        line += f"\n{'':<21}{event.detail.splitlines()[0][:160]}"
    return line


async def _audit(args: argparse.Namespace) -> None:
    request = audit_pb2.ListAuditEventsRequest(
        principal=args.principal or "",
        method=_full_method(args.method or ""),
        target=args.target or "",
        page_size=min(args.limit, 1000),
    )
    events: list[audit_pb2.AuditEvent] = []
    async with _channel(args) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        while len(events) < args.limit:
            response = await stub.ListAuditEvents(request, timeout=10)
            events.extend(response.events)
            request.page_token = response.next_page_token
            if not request.page_token:
                break
    print(f"{'TIME':<19}  {'OUTCOME':<18} {'METHOD':<30} {'TARGET':<24} PRINCIPAL")
    for event in events[: args.limit]:
        print(_audit_line(event))
    if not events:
        print("(no audit events match)")


def _phase_name(value: int) -> str:
    return plan_pb2.PlanPhase.Name(value).removeprefix("PLAN_PHASE_")  # type: ignore[arg-type]


def _plan_line(plan: plan_pb2.Plan) -> str:
    when = plan.create_time.ToDatetime(dt.UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    actions = ",".join(step.action for step in plan.steps)
    return f"{plan.plan_id:<36} {_phase_name(plan.phase):<18} {when}  {plan.source:<12} {actions}"


async def _submit(args: argparse.Namespace) -> None:
    text = await asyncio.to_thread(pathlib.Path(args.file).read_text)
    plan = json_format.Parse(text, plan_pb2.Plan())
    async with _channel(args) as channel:
        response = await plan_pb2_grpc.PlanServiceStub(channel).SubmitPlan(
            plan_pb2.SubmitPlanRequest(plan=plan, validate_only=args.validate_only), timeout=30
        )
    result = response.plan
    label = "would be" if args.validate_only else "is"
    print(f"plan {result.plan_id or '(not stored)'} {label} {_phase_name(result.phase)}")
    for violation in result.violations:
        print(f"  {violation.rule_id}: {violation.message} [{violation.field}]")
    for command in response.preview:
        print(
            f"  step {command.step_index} wave {command.wave}: "
            f"{command.action} on {command.node_id}"
        )


async def _plans(args: argparse.Namespace) -> None:
    request = plan_pb2.ListPlansRequest(target=args.target or "", page_size=500)
    if args.phase:
        request.phase = plan_pb2.PlanPhase.Value(f"PLAN_PHASE_{args.phase.upper()}")
    async with _channel(args) as channel:
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
    async with _channel(args) as channel:
        response = await plan_pb2_grpc.PlanServiceStub(channel).GetPlan(
            plan_pb2.GetPlanRequest(plan_id=args.plan_id), timeout=10
        )
    print(json_format.MessageToJson(response.plan, preserving_proto_field_name=True))


def _transition_line(t: plan_pb2.PlanTransition) -> str:
    when = t.time.ToDatetime(dt.UTC).astimezone().strftime("%H:%M:%S")
    moved = f"{_phase_name(t.from_phase)} -> {_phase_name(t.to_phase)}"
    return f"{when}  {moved}  ({t.actor}) {t.reason}"


async def _watch(args: argparse.Namespace) -> None:
    async with _channel(args) as channel:
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
    async with _channel(args) as channel:
        response = await plan_pb2_grpc.PlanServiceStub(channel).ApprovePlan(
            plan_pb2.ApprovePlanRequest(plan_id=args.plan_id, reason=args.reason or ""), timeout=10
        )
    print(f"plan {response.plan.plan_id} is {_phase_name(response.plan.phase)}")


async def _cancel(args: argparse.Namespace) -> None:
    async with _channel(args) as channel:
        response = await plan_pb2_grpc.PlanServiceStub(channel).CancelPlan(
            plan_pb2.CancelPlanRequest(plan_id=args.plan_id, reason=args.reason or ""), timeout=10
        )
    plan = response.plan
    print(f"plan {plan.plan_id} is {_phase_name(plan.phase)} {plan.status_message}".rstrip())


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(value: str) -> duration_pb2.Duration:
    """`90s`, `30m`, `2h`, `1d` (a bare number is seconds)."""
    number, unit = (value[:-1], value[-1]) if value[-1:] in _DURATION_UNITS else (value, "s")
    try:
        seconds = float(number) * _DURATION_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a duration like 30m, 2h or 90s"
        ) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: the duration must be positive")
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


async def _token_create(args: argparse.Namespace) -> None:
    request = enrollment_pb2.CreateBootstrapTokenRequest(node_pattern=args.node, max_uses=args.uses)
    if args.ttl is not None:
        request.ttl.CopyFrom(args.ttl)
    async with _channel(args) as channel:
        response = await enrollment_pb2_grpc.EnrollmentServiceStub(channel).CreateBootstrapToken(
            request
        )
    expires = response.expire_time.ToDatetime(dt.UTC).isoformat(timespec="seconds")
    # The token on stdout alone, so `TOKEN=$(sentinelctl token create ...)` works.
    print(response.token)
    print(
        f"token {response.token_id} for nodes {args.node!r}, {args.uses} use(s), expires "
        f"{expires}; it is shown only this once",
        file=sys.stderr,
    )


def _when(ts: timestamp_pb2.Timestamp) -> str:
    return ts.ToDatetime(dt.UTC).isoformat(timespec="seconds")


async def _revoke(args: argparse.Namespace) -> None:
    async with _channel(args) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        reason = args.reason or ""
        response: identity_pb2.RevokeCertificateResponse | identity_pb2.RevokeNodeResponse
        if args.serial:
            response = await stub.RevokeCertificate(
                identity_pb2.RevokeCertificateRequest(serial=args.serial, reason=reason), timeout=10
            )
        else:
            response = await stub.RevokeNode(
                identity_pb2.RevokeNodeRequest(node_id=args.node, reason=reason), timeout=10
            )
    revocation = response.revocation
    print(
        f"revoked {revocation.kind} {revocation.value} at {_when(revocation.revoke_time)}; "
        f"{response.sessions_closed} open session(s) closed"
    )


async def _revocations(args: argparse.Namespace) -> None:
    async with _channel(args) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        token = ""
        print(f"{'KIND':<7} {'VALUE':<42} {'REVOKED':<26} {'BY':<40} REASON")
        while True:
            page = await stub.ListRevocations(
                identity_pb2.ListRevocationsRequest(page_token=token), timeout=10
            )
            for r in page.revocations:
                print(
                    f"{r.kind:<7} {r.value:<42} {_when(r.revoke_time):<26} "
                    f"{r.revoked_by:<40} {r.reason}"
                )
            token = page.next_page_token
            if not token:
                return


async def _user_add(args: argparse.Namespace) -> None:
    password = os.environ.get("SENTINEL_PASSWORD") or getpass.getpass(f"password for {args.name}: ")
    async with _channel(args) as channel:
        response = await identity_pb2_grpc.IdentityServiceStub(channel).CreateUser(
            identity_pb2.CreateUserRequest(username=args.name, role=args.role, password=password),
            timeout=10,
        )
    print(f"user {response.user.username} created with role {response.user.role}")


async def _user_delete(args: argparse.Namespace) -> None:
    async with _channel(args) as channel:
        await identity_pb2_grpc.IdentityServiceStub(channel).DeleteUser(
            identity_pb2.DeleteUserRequest(username=args.name), timeout=10
        )
    print(f"user {args.name} deleted")


async def _users(args: argparse.Namespace) -> None:
    async with _channel(args) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        token = ""
        while True:
            page = await stub.ListUsers(identity_pb2.ListUsersRequest(page_token=token), timeout=10)
            for user in page.users:
                print(f"{user.username:<40} {user.role:<9} created {_when(user.create_time)}")
            token = page.next_page_token
            if not token:
                return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sentinelctl",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--server", default=os.environ.get("SENTINEL_SERVER", "localhost:7443"))
    parser.add_argument("--certs-dir", default=os.environ.get("SENTINEL_CERTS_DIR", ".dev/certs"))
    parser.add_argument(
        "--identity",
        default=os.environ.get("SENTINEL_IDENTITY", "operator-admin"),
        help="certificate stem in --certs-dir, e.g. operator-admin or viewer-readonly",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("agents", help="list agents").set_defaults(func=_agents)
    agent = sub.add_parser("agent", help="show one agent")
    agent.add_argument("node")
    agent.set_defaults(func=_agent)
    telemetry = sub.add_parser("telemetry", help="latest or live telemetry")
    telemetry.add_argument("--node")
    telemetry.add_argument("--follow", "-f", action="store_true")
    telemetry.set_defaults(func=_telemetry)
    audit = sub.add_parser("audit", help="recent audit events, newest first")
    audit.add_argument("--principal", help="exact SPIFFE id of the caller")
    audit.add_argument("--method", help="e.g. PlanService/CancelPlan or plan.transition")
    audit.add_argument("--target", help="exact resource, e.g. plan/<id>")
    audit.add_argument("--limit", type=_positive, default=50, help="most events shown (default 50)")
    audit.set_defaults(func=_audit)
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
    token = sub.add_parser("token", help="bootstrap tokens for enrolling nodes")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="create a bootstrap token (printed once)")
    create.add_argument("--node", required=True, help="node name or glob, e.g. gpu-node-*")
    create.add_argument("--uses", type=_positive, default=1, help="enrollments allowed (1)")
    create.add_argument(
        "--ttl", type=_duration, default=None, help="lifetime, e.g. 30m (server default)"
    )
    create.set_defaults(func=_token_create)
    revoke = sub.add_parser("revoke", help="revoke a certificate (by serial) or a node")
    what = revoke.add_mutually_exclusive_group(required=True)
    what.add_argument("--serial", help="certificate serial in hex, as openssl prints it")
    what.add_argument("--node", help="node id: every certificate issued to it until now")
    revoke.add_argument("--reason")
    revoke.set_defaults(func=_revoke)
    sub.add_parser("revocations", help="list revocations").set_defaults(func=_revocations)
    user = sub.add_parser("user", help="users who log in with a password")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    user_add = user_sub.add_parser("add", help="create a user")
    user_add.add_argument("name")
    user_add.add_argument("--role", required=True, choices=("operator", "viewer"))
    user_add.set_defaults(func=_user_add)
    user_delete = user_sub.add_parser("delete", help="delete a user")
    user_delete.add_argument("name")
    user_delete.set_defaults(func=_user_delete)
    sub.add_parser("users", help="list users").set_defaults(func=_users)
    args = parser.parse_args(argv)
    try:
        asyncio.run(args.func(args))
    except grpc.aio.AioRpcError as exc:
        print(f"sentinelctl: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except json_format.ParseError as exc:
        print(f"sentinelctl: {args.file}: not a sentinel.v1.Plan in JSON: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(
            f"sentinelctl: {exc.filename}: no such file (see `sentinel-certs init`)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
