"""The `audit` command: recent events from AuditService, newest first, filtered by caller,
method or target."""

from __future__ import annotations

import argparse

from sentinel.v1 import audit_pb2, audit_pb2_grpc

from sentinelctl._connection import open_channel
from sentinelctl._values import local_time, positive


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `audit`."""
    audit = sub.add_parser("audit", help="recent audit events, newest first")
    audit.add_argument("--principal", help="exact SPIFFE id of the caller")
    audit.add_argument("--method", help="e.g. PlanService/CancelPlan or plan.transition")
    audit.add_argument("--target", help="exact resource, e.g. plan/<id>")
    audit.add_argument("--limit", type=positive, default=50, help="most events shown (default 50)")
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


async def _audit(args: argparse.Namespace) -> None:
    request = audit_pb2.ListAuditEventsRequest(
        principal=args.principal or "",
        method=_full_method(args.method or ""),
        target=args.target or "",
        page_size=min(args.limit, 1000),
    )
    events: list[audit_pb2.AuditEvent] = []
    async with open_channel(args) as channel:
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
