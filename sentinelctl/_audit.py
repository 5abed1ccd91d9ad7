"""The `audit` command: recent events from AuditService, newest first, filtered by caller,
method or target."""

from __future__ import annotations

import argparse

from sentinel.v1 import audit_pb2

from sentinelclient import SentinelClient
from sentinelctl._output import add_output_argument, print_messages
from sentinelctl._values import local_time, positive


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `audit`."""
    audit = sub.add_parser("audit", help="recent audit events, newest first")
    audit.add_argument("--principal", help="exact SPIFFE id of the caller")
    audit.add_argument("--method", help="e.g. PlanService/CancelPlan or plan.transition")
    audit.add_argument("--target", help="exact resource, e.g. plan/<id>")
    audit.add_argument("--limit", type=positive, default=50, help="most events shown (default 50)")
    add_output_argument(audit)
    audit.set_defaults(func=_audit)


def _full_method(method: str) -> str:
    """Accepts "PlanService/CancelPlan" for "/sentinel.v1.PlanService/CancelPlan"."""
    if "/" in method and not method.startswith("/"):
        return f"/sentinel.v1.{method}"
    return method


def _audit_line(event: audit_pb2.AuditEvent) -> str:
    when = local_time(event.time, "%Y-%m-%d %H:%M:%S")
    method = event.method.removeprefix("/sentinel.v1.")
    line = f"{when}  {event.outcome:<18} {method:<30} {event.target:<24} {event.principal}"
    if event.detail:
        line += f"\n{'':<21}{event.detail.splitlines()[0][:160]}"
    return line


def _audit(args: argparse.Namespace, client: SentinelClient) -> None:
    events = client.list_audit_events(
        principal=args.principal or "",
        method=_full_method(args.method or ""),
        target=args.target or "",
        limit=args.limit,
    )
    if args.output != "table":
        print_messages(events, args.output)
        return
    print(f"{'TIME':<19}  {'OUTCOME':<18} {'METHOD':<30} {'TARGET':<24} PRINCIPAL")
    for event in events:
        print(_audit_line(event))
    if not events:
        print("(no audit events match)")
