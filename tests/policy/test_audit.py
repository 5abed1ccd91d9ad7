"""The audit log: mutating and refused calls are recorded by the interceptor and listed by
AuditService; `audit_row` writes inside a caller's transaction."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from sentinel.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    plan_pb2,
    plan_pb2_grpc,
)
from sqlalchemy import Connection, insert, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from certs import Identity
from controlplane import ControlPlane
from controlplane.audit import AuditLog, audit_row
from controlplane.store import AUDIT_EVENTS, Store
from sentinelctl import cli as ctl
from tests.conftest import TRUST_DOMAIN, ControlPlaneFactory, Pki, eventually

_V1 = "/sentinel.v1."
_APPROVE = f"{_V1}PlanService/ApprovePlan"
_CANCEL = f"{_V1}PlanService/CancelPlan"
_SUBMIT = f"{_V1}PlanService/SubmitPlan"
_LIST_AGENTS = f"{_V1}FleetService/ListAgents"
_PAST = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


def _spiffe(role: str, name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/{role}/{name}"


def _channel(pki: Pki, cp: ControlPlane, role: str, name: str) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(f"localhost:{cp.port}", pki.channel_credentials(role, name))


def _stamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


async def _list_all(
    pki: Pki, cp: ControlPlane, page_size: int = 0, **filters: Any
) -> list[audit_pb2.AuditEvent]:
    """Every event matching `filters`, following page tokens, as an operator sees them."""
    events: list[audit_pb2.AuditEvent] = []
    async with _channel(pki, cp, "operator", "auditor") as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        request = audit_pb2.ListAuditEventsRequest(page_size=page_size, **filters)
        while True:
            response = await stub.ListAuditEvents(request, timeout=10)
            events.extend(response.events)
            if not response.next_page_token:
                return events
            request.page_token = response.next_page_token


async def _refused_list(pki: Pki, cp: ControlPlane, **fields: Any) -> grpc.aio.AioRpcError:
    async with _channel(pki, cp, "operator", "auditor") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await audit_pb2_grpc.AuditServiceStub(channel).ListAuditEvents(
                audit_pb2.ListAuditEventsRequest(**fields), timeout=10
            )
    return refused.value


async def _insert_rows(cp: ControlPlane, rows: list[dict[str, Any]]) -> None:
    def write(db: Connection) -> None:
        db.execute(insert(AUDIT_EVENTS), rows)

    await cp.store.run_core(write)


def _newest_first(events: list[audit_pb2.AuditEvent]) -> bool:
    keys = [(e.time.ToNanoseconds(), e.event_id) for e in events]
    return keys == sorted(keys, reverse=True)


async def test_refused_call_is_audited_with_the_callers_identity(
    pki: Pki, control_plane: ControlPlane
) -> None:
    async with _channel(pki, control_plane, "viewer", "mallory") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await plan_pb2_grpc.PlanServiceStub(channel).ApprovePlan(
                plan_pb2.ApprovePlanRequest(plan_id="plan-42"), timeout=5
            )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

    [event] = await _list_all(pki, control_plane, method=_APPROVE)
    assert event.principal == _spiffe("viewer", "mallory")
    assert event.outcome == "PERMISSION_DENIED"
    assert event.target == "plan/plan-42"
    assert "may not call" in event.detail
    assert event.event_id and event.time.seconds > 0
    outcomes = control_plane.metrics.registry.get_sample_value(
        "sentinel_audit_events_total", {"outcome": "PERMISSION_DENIED"}
    )
    assert outcomes == 1


async def test_refused_read_call_is_audited(pki: Pki, control_plane: ControlPlane) -> None:
    async with _channel(pki, control_plane, "agent", "node-7") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await fleet_pb2_grpc.FleetServiceStub(channel).ListAgents(
                fleet_pb2.ListAgentsRequest(), timeout=5
            )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

    [event] = await _list_all(pki, control_plane, method=_LIST_AGENTS)
    assert (event.principal, event.outcome) == (_spiffe("agent", "node-7"), "PERMISSION_DENIED")


async def test_unauthenticated_call_is_audited_with_the_identity_it_presented(
    pki: Pki, control_plane: ControlPlane
) -> None:
    issued = pki.ca.issue_client(Identity("elsewhere.example", "operator", "eve"))
    credentials = grpc.ssl_channel_credentials(
        pki.ca_path.read_bytes(), issued.private_key_pem, issued.certificate_pem
    )
    async with grpc.aio.secure_channel(f"localhost:{control_plane.port}", credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await fleet_pb2_grpc.FleetServiceStub(channel).ListAgents(
                fleet_pb2.ListAgentsRequest(), timeout=5
            )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    [event] = await _list_all(pki, control_plane, method=_LIST_AGENTS)
    assert event.principal == "spiffe://elsewhere.example/operator/eve"
    assert event.outcome == "UNAUTHENTICATED"
    assert event.detail.startswith("client identity refused")


async def test_allowed_mutating_call_is_audited_with_its_outcome_and_target(
    pki: Pki, control_plane: ControlPlane
) -> None:
    async with _channel(pki, control_plane, "operator", "alice") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await plan_pb2_grpc.PlanServiceStub(channel).CancelPlan(
                plan_pb2.CancelPlanRequest(plan_id="no-such-plan", reason="test"), timeout=5
            )
    # Allowed through, then answered by the plan service itself: the audit log says the same.
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-plan" in (failed.value.details() or "")

    [event] = await _list_all(pki, control_plane, method=_CANCEL)
    assert event.principal == _spiffe("operator", "alice")
    assert event.outcome == "NOT_FOUND"
    assert event.target == "plan/no-such-plan"
    assert event.detail == failed.value.details()


async def test_dry_run_submission_is_audited_as_validate_only_under_its_request_id(
    pki: Pki, control_plane: ControlPlane
) -> None:
    async with _channel(pki, control_plane, "planner", "inframind") as channel:
        # A dry run of a plan without steps or source: refused, and audited as what it was.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await plan_pb2_grpc.PlanServiceStub(channel).SubmitPlan(
                plan_pb2.SubmitPlanRequest(request_id="req-9", validate_only=True), timeout=5
            )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    [event] = await _list_all(pki, control_plane, method=_SUBMIT)
    assert event.principal == _spiffe("planner", "inframind")
    assert event.outcome == "INVALID_ARGUMENT"
    assert event.target == "request/req-9"
    assert event.detail.split(":")[0] == "validate_only"


async def test_successful_read_calls_are_not_audited(pki: Pki, control_plane: ControlPlane) -> None:
    async with _channel(pki, control_plane, "operator", "alice") as channel:
        await fleet_pb2_grpc.FleetServiceStub(channel).ListAgents(
            fleet_pb2.ListAgentsRequest(), timeout=5
        )
    assert await _list_all(pki, control_plane) == []


async def test_viewer_may_not_list_audit_events(pki: Pki, control_plane: ControlPlane) -> None:
    async with _channel(pki, control_plane, "viewer", "bob") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await audit_pb2_grpc.AuditServiceStub(channel).ListAuditEvents(
                audit_pb2.ListAuditEventsRequest(), timeout=5
            )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_filters_match_principal_method_and_target_exactly(
    pki: Pki, control_plane: ControlPlane
) -> None:
    audit = control_plane.audit
    for principal in ("spiffe://x/operator/a", "spiffe://x/operator/ab"):
        for method in (_APPROVE, _CANCEL):
            for target in ("plan/1", "plan/10"):
                await audit.record(principal, method, target, "OK")

    by_principal = await _list_all(pki, control_plane, principal="spiffe://x/operator/a")
    assert len(by_principal) == 4
    assert {e.principal for e in by_principal} == {"spiffe://x/operator/a"}

    by_method = await _list_all(pki, control_plane, method=_CANCEL)
    assert len(by_method) == 4
    assert {e.method for e in by_method} == {_CANCEL}

    by_target = await _list_all(pki, control_plane, target="plan/1")
    assert len(by_target) == 4
    assert {e.target for e in by_target} == {"plan/1"}

    combined = await _list_all(
        pki, control_plane, principal="spiffe://x/operator/ab", method=_APPROVE, target="plan/10"
    )
    assert [(e.principal, e.method, e.target) for e in combined] == [
        ("spiffe://x/operator/ab", _APPROVE, "plan/10")
    ]


async def test_time_range_includes_its_start_and_excludes_its_end(
    pki: Pki, control_plane: ControlPlane
) -> None:
    times = [_PAST + dt.timedelta(seconds=s) for s in range(5)]
    await _insert_rows(
        control_plane, [audit_row("p", "m", f"t/{i}", "OK", at=at) for i, at in enumerate(times)]
    )

    listed = await _list_all(
        pki, control_plane, start_time=_stamp(times[1]), end_time=_stamp(times[3])
    )
    assert [e.target for e in listed] == ["t/2", "t/1"]
    from_last = await _list_all(pki, control_plane, start_time=_stamp(times[4]))
    assert [e.target for e in from_last] == ["t/4"]
    assert [e.target for e in await _list_all(pki, control_plane, end_time=_stamp(times[1]))] == [
        "t/0"
    ]


async def test_paging_lists_every_event_exactly_once_newest_first(
    pki: Pki, control_plane: ControlPlane
) -> None:
    audit = control_plane.audit
    recorded = [
        (await audit.record("spiffe://x/operator/a", _CANCEL, f"plan/{i}", "OK")).event_id
        for i in range(130)
    ]
    await audit.flush()
    # Many events in the same microsecond: paging must not skip or repeat any of them.
    same_instant = [audit_row("p", _APPROVE, f"plan/s{i}", "OK", at=_PAST) for i in range(25)]
    await _insert_rows(control_plane, same_instant)

    listed = await _list_all(pki, control_plane, page_size=7)
    ids = [e.event_id for e in listed]
    assert len(ids) == len(set(ids)) == 155
    assert set(ids) == set(recorded) | {row["event_id"] for row in same_instant}
    assert _newest_first(listed)
    assert ids[:130] == recorded[::-1]


async def test_page_size_limits_a_page_and_the_token_continues_it(
    pki: Pki, control_plane: ControlPlane
) -> None:
    for i in range(5):
        await control_plane.audit.record("p", _CANCEL, f"plan/{i}", "OK")
    async with _channel(pki, control_plane, "operator", "auditor") as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        first = await stub.ListAuditEvents(audit_pb2.ListAuditEventsRequest(page_size=3))
        rest = await stub.ListAuditEvents(
            audit_pb2.ListAuditEventsRequest(page_size=3, page_token=first.next_page_token)
        )
    assert [e.target for e in first.events] == ["plan/4", "plan/3", "plan/2"]
    assert [e.target for e in rest.events] == ["plan/1", "plan/0"]
    assert rest.next_page_token == ""


@pytest.mark.parametrize("token", ["garbage!", "Zm9v", "YTE6eHl6OmV2"])
async def test_bad_page_token_is_invalid_argument_naming_page_token(
    pki: Pki, control_plane: ControlPlane, token: str
) -> None:
    refused = await _refused_list(pki, control_plane, page_token=token)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.details().startswith("page_token:")


async def test_negative_page_size_is_invalid_argument_naming_page_size(
    pki: Pki, control_plane: ControlPlane
) -> None:
    refused = await _refused_list(pki, control_plane, page_size=-1)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.details().startswith("page_size:")


async def test_start_after_end_is_invalid_argument_naming_end_time(
    pki: Pki, control_plane: ControlPlane
) -> None:
    refused = await _refused_list(
        pki,
        control_plane,
        start_time=_stamp(_PAST + dt.timedelta(seconds=1)),
        end_time=_stamp(_PAST),
    )
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.details().startswith("end_time:")


async def test_audited_calls_survive_a_restart(
    pki: Pki, control_plane_factory: ControlPlaneFactory
) -> None:
    # A flush interval longer than the test: only the flush on stop can write the event.
    first = await control_plane_factory(audit_flush_interval_s=3600.0)
    async with _channel(pki, first, "viewer", "mallory") as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await plan_pb2_grpc.PlanServiceStub(channel).ApprovePlan(
                plan_pb2.ApprovePlanRequest(plan_id="plan-1"), timeout=5
            )
    assert first.audit.pending == 1
    await first.stop()

    second = await control_plane_factory()
    [event] = await _list_all(pki, second, method=_APPROVE)
    assert (event.principal, event.target) == (_spiffe("viewer", "mallory"), "plan/plan-1")


async def test_audit_row_is_rolled_back_with_its_transaction(
    pki: Pki, control_plane: ControlPlane
) -> None:
    class Abandoned(Exception):
        pass

    def transition_then_fail(db: Connection) -> None:
        db.execute(
            insert(AUDIT_EVENTS),
            [audit_row("spiffe://x/c", "plan.transition", "plan/p1", "APPROVED", "A → B: ok")],
        )
        raise Abandoned

    def transition(db: Session) -> None:
        db.execute(
            insert(AUDIT_EVENTS),
            [audit_row("spiffe://x/c", "plan.transition", "plan/p2", "APPROVED", "A → B: ok")],
        )

    with pytest.raises(Abandoned):
        await control_plane.store.run_core(transition_then_fail)
    await control_plane.store.run(transition)  # an ORM Session works as well

    listed = await _list_all(pki, control_plane, method="plan.transition")
    assert [(e.target, e.outcome, e.detail) for e in listed] == [
        ("plan/p2", "APPROVED", "A → B: ok")
    ]


async def test_failed_audit_writes_are_counted_kept_and_never_fail_the_call(
    pki: Pki, control_plane: ControlPlane
) -> None:
    def drop_table(db: Connection) -> None:
        db.execute(text("DROP TABLE audit_events"))

    await control_plane.store.run_core(drop_table)
    async with _channel(pki, control_plane, "viewer", "mallory") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await plan_pb2_grpc.PlanServiceStub(channel).ApprovePlan(
                plan_pb2.ApprovePlanRequest(plan_id="plan-5"), timeout=5
            )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

    def failures() -> float:
        value = control_plane.metrics.registry.get_sample_value(
            "sentinel_task_failures_total", {"task": "audit-writer"}
        )
        return value or 0.0

    await eventually(failures)
    assert control_plane.audit.pending == 1

    def create_table(db: Connection) -> None:
        AUDIT_EVENTS.create(db)

    await control_plane.store.run_core(create_table)
    [event] = await _list_all(pki, control_plane, method=_APPROVE)
    assert event.target == "plan/plan-5"


async def test_a_full_queue_waits_for_a_flush_and_drops_only_past_its_hard_limit(
    database_url: str,
) -> None:
    store = Store(database_url)
    store.migrate()
    try:
        audit = AuditLog(store, max_pending=2)
        await audit.record("p", "m", "t/0", "OK")
        assert audit.pending == 1
        await audit.record("p", "m", "t/1", "OK")
        assert audit.pending == 0  # the second record filled the queue and waited for a write
        written = store.run_core_sync(lambda db: len(db.execute(AUDIT_EVENTS.select()).all()))
        assert written == 2

        store.run_core_sync(lambda db: db.execute(text("DROP TABLE audit_events")))
        for i in range(2, 24):
            # The store's error reaches each caller that waited for a flush.
            with contextlib.suppress(DBAPIError):
                await audit.record("p", "m", f"t/{i}", "OK")
        assert (audit.pending, audit.dropped) == (20, 2)

        store.run_core_sync(AUDIT_EVENTS.create)  # the written t/0 and t/1 went with the table
        assert await audit.flush() == 20
        stored = store.run_core_sync(
            lambda db: [row.target for row in db.execute(AUDIT_EVENTS.select())]
        )
        assert sorted(stored, key=lambda t: int(t.split("/")[1])) == [
            f"t/{i}" for i in range(4, 24)
        ]
    finally:
        store.close()


async def test_sentinelctl_audit_prints_matching_events(
    pki: Pki, control_plane: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    await control_plane.audit.record(_spiffe("operator", "alice"), _CANCEL, "plan/p7", "NOT_FOUND")
    await control_plane.audit.record(_spiffe("operator", "alice"), _APPROVE, "plan/p8", "OK")
    pki.client("operator", "admin")
    argv = [
        "--server",
        f"localhost:{control_plane.port}",
        "--certs-dir",
        str(pki.directory),
        "--identity",
        "operator-admin",
        "audit",
        "--method",
        "PlanService/CancelPlan",
    ]
    assert await asyncio.to_thread(ctl.main, argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["TIME", "OUTCOME", "METHOD", "TARGET", "PRINCIPAL"]
    assert len(lines) == 2
    assert "PlanService/CancelPlan" in lines[1]
    assert "plan/p7" in lines[1]
    assert "NOT_FOUND" in lines[1]
