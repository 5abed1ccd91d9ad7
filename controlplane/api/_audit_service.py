"""`AuditService`: filtered, paged listing of the audit log, newest first."""

from __future__ import annotations

import datetime as dt

import grpc
from google.protobuf import timestamp_pb2
from sentinel.v1 import audit_pb2, audit_pb2_grpc

from controlplane.api import _convert, _paging
from controlplane.api._errors import abort
from controlplane.audit import AuditEvent, AuditFilter, AuditLog, InvalidPageToken


def _event_message(event: AuditEvent) -> audit_pb2.AuditEvent:
    return audit_pb2.AuditEvent(
        event_id=event.event_id,
        time=_convert.timestamp(event.at),
        principal=event.principal,
        method=event.method,
        target=event.target,
        outcome=event.outcome,
        detail=event.detail,
    )


class AuditService(audit_pb2_grpc.AuditServiceServicer):
    """Lists audit events for operators, filtered and paged."""

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit

    @staticmethod
    async def _time(
        request: audit_pb2.ListAuditEventsRequest,
        field: str,
        context: grpc.aio.ServicerContext,
    ) -> dt.datetime | None:
        if not request.HasField(field):  # type: ignore[arg-type]
            return None
        stamp: timestamp_pb2.Timestamp = getattr(request, field)
        try:
            return stamp.ToDatetime(dt.UTC)
        except (ValueError, OverflowError) as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {exc}")

    async def ListAuditEvents(
        self, request: audit_pb2.ListAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ListAuditEventsResponse:
        try:
            size = _paging.page_size(request.page_size)
        except _paging.PageError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        start = await self._time(request, "start_time", context)
        end = await self._time(request, "end_time", context)
        if start is not None and end is not None and start > end:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"end_time: {end.isoformat()} is before start_time {start.isoformat()}",
            )
        for name in ("principal", "method", "target"):
            value = getattr(request, name)
            if "\x00" in value or len(value) > 512:
                await abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{name}: at most 512 characters, no NUL",
                )
        audit_filter = AuditFilter(
            principal=request.principal,
            method=request.method,
            target=request.target,
            start=start,
            end=end,
        )
        try:
            events, token = await self._audit.list(audit_filter, size, request.page_token)
        except InvalidPageToken as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return audit_pb2.ListAuditEventsResponse(
            events=[_event_message(e) for e in events], next_page_token=token
        )
