"""`EventService`: the stream of domain events (WatchEvents) and its stored history
(ListEvents), with the translation of stored events into `sentinel.v1.Event` messages."""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from sentinel.v1 import events_pb2, events_pb2_grpc, fleet_pb2, plan_pb2

from controlplane.api import _paging
from controlplane.api._convert import timestamp
from controlplane.api._errors import abort
from controlplane.events import (
    AGENT_STATUS_CHANGED,
    ANALYSIS_MEASURED,
    BREAKER_CHANGED,
    COMMAND_FINISHED,
    PLAN_TRANSITIONED,
    REVOKED,
    Event,
    EventFilter,
    EventLog,
    EventWatchOverflow,
)

log = logging.getLogger(__name__)

_KIND_TO_PB = {
    AGENT_STATUS_CHANGED: events_pb2.EVENT_KIND_AGENT_STATUS_CHANGED,
    PLAN_TRANSITIONED: events_pb2.EVENT_KIND_PLAN_TRANSITIONED,
    COMMAND_FINISHED: events_pb2.EVENT_KIND_COMMAND_FINISHED,
    ANALYSIS_MEASURED: events_pb2.EVENT_KIND_ANALYSIS_MEASURED,
    REVOKED: events_pb2.EVENT_KIND_REVOKED,
    BREAKER_CHANGED: events_pb2.EVENT_KIND_BREAKER_CHANGED,
}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}
_NEGATIVE_AFTER = "after_event_id: must not be negative"
_UNKNOWN_PAGE = "page_token: not a token this server issued"


def _agent_status(name: str) -> fleet_pb2.AgentStatus.ValueType:
    if not name:
        return fleet_pb2.AGENT_STATUS_UNSPECIFIED
    return fleet_pb2.AgentStatus.Value(f"AGENT_STATUS_{name}")


def _phase(name: str) -> plan_pb2.PlanPhase.ValueType:
    return plan_pb2.PlanPhase.Value(f"PLAN_PHASE_{name}")


def _time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def _fill_detail(message: events_pb2.Event, kind: str, p: dict[str, Any]) -> None:
    if kind == AGENT_STATUS_CHANGED:
        message.agent_status_changed.CopyFrom(
            events_pb2.AgentStatusChanged(
                node_id=p["node_id"],
                status=_agent_status(p["status"]),
                previous_status=_agent_status(p.get("previous_status", "")),
                session_id=p.get("session_id", ""),
            )
        )
    elif kind == PLAN_TRANSITIONED:
        transition = plan_pb2.PlanTransition(
            from_phase=_phase(p["from_phase"]),
            to_phase=_phase(p["to_phase"]),
            actor=p.get("actor", ""),
            reason=p.get("reason", ""),
        )
        transition.time.FromDatetime(_time(p["time"]))
        message.plan_transitioned.CopyFrom(
            events_pb2.PlanTransitioned(plan_id=p["plan_id"], transition=transition)
        )
    elif kind == COMMAND_FINISHED:
        finished = events_pb2.CommandFinished(
            command_id=p["command_id"],
            node_id=p["node_id"],
            action=p.get("action", ""),
            outcome=p.get("outcome", ""),
            message=p.get("message", ""),
        )
        finished.output.update(p.get("output") or {})
        message.command_finished.CopyFrom(finished)
    elif kind == ANALYSIS_MEASURED:
        measurement = plan_pb2.AnalysisMeasurement(
            gate=p.get("gate", ""),
            step_index=p.get("step_index", 0),
            target=p.get("target", ""),
            point=p.get("point", ""),
            query=p.get("query", ""),
            condition=p.get("condition", ""),
            verdict=p.get("verdict", ""),
            message=p.get("message", ""),
        )
        value: Any = p.get("value")
        measurement.value.CopyFrom(json_format.ParseDict(value, struct_pb2.Value()))
        if p.get("started_at"):
            measurement.start_time.FromDatetime(_time(p["started_at"]))
        if p.get("finished_at"):
            measurement.end_time.FromDatetime(_time(p["finished_at"]))
        message.analysis_measured.CopyFrom(
            events_pb2.AnalysisMeasured(plan_id=p["plan_id"], measurement=measurement)
        )
    elif kind == REVOKED:
        message.revoked.CopyFrom(
            events_pb2.Revoked(
                revocation_kind=p["revocation_kind"],
                value=p["value"],
                reason=p.get("reason", ""),
                revoked_by=p.get("revoked_by", ""),
            )
        )
    elif kind == BREAKER_CHANGED:
        message.breaker_changed.CopyFrom(
            events_pb2.BreakerChanged(
                tripped=bool(p["tripped"]), reason=p.get("reason", ""), actor=p.get("actor", "")
            )
        )


def event_message(event: Event) -> events_pb2.Event:
    """The API's view of a stored event. A payload that does not fit its kind's message (a
    newer replica's field, say) leaves the detail empty rather than fail the stream."""
    message = events_pb2.Event(
        event_id=event.event_id,
        time=timestamp(event.at),
        kind=_KIND_TO_PB.get(event.kind, events_pb2.EVENT_KIND_UNSPECIFIED),
        subject=event.subject,
        replica_id=event.replica_id,
    )
    try:
        _fill_detail(message, event.kind, event.payload)
    except (KeyError, ValueError, TypeError, json_format.ParseError) as exc:
        log.warning("event %d (%s) has an unreadable payload: %s", event.event_id, event.kind, exc)
    return message


async def _event_filter(
    context: grpc.aio.ServicerContext, kinds: Iterable[int], subject_prefix: str
) -> EventFilter:
    wanted: set[str] = set()
    for index, value in enumerate(kinds):
        kind = _KIND_FROM_PB.get(value)  # type: ignore[call-overload]
        if kind is None:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"kinds[{index}]: unknown event kind {value}",
            )
        wanted.add(kind)
    if "\x00" in subject_prefix:
        # No subject holds one, and PostgreSQL refuses NUL in text.
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "subject_prefix: must not hold NUL")
    if len(subject_prefix) > 512:
        await abort(
            context, grpc.StatusCode.INVALID_ARGUMENT, "subject_prefix: at most 512 characters"
        )
    return EventFilter(frozenset(wanted), subject_prefix)


class EventService(events_pb2_grpc.EventServiceServicer):
    """Streams and lists the stored domain events."""

    def __init__(self, events: EventLog, watch_backlog: int = 10_000) -> None:
        self._events = events
        self._backlog = watch_backlog

    async def WatchEvents(
        self, request: events_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[events_pb2.WatchEventsResponse]:
        event_filter = await _event_filter(context, request.kinds, request.subject_prefix)
        after: int | None = None
        if request.HasField("after_event_id"):
            if request.after_event_id < 0:
                await abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "after_event_id: must not be negative",
                )
            after = request.after_event_id
        last = after or 0
        try:
            # The response headers go out once the watch is subscribed: a client that waits for
            # them knows every event stored from then on will reach it.
            live = functools.partial(context.send_initial_metadata, ())
            async for event in self._events.watch(event_filter, after, self._backlog, live):
                last = event.event_id
                yield events_pb2.WatchEventsResponse(event=event_message(event))
        except EventWatchOverflow as exc:
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{exc} (the last one sent was {last}: watch again with after_event_id={last})",
            )

    async def ListEvents(
        self, request: events_pb2.ListEventsRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.ListEventsResponse:
        event_filter = await _event_filter(context, request.kinds, request.subject_prefix)
        if request.after_event_id < 0:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, _NEGATIVE_AFTER)
        try:
            size = _paging.page_size(request.page_size)
            token = _paging.decode_token(request.page_token)
            after = int(token) if token else request.after_event_id
        except _paging.PageError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ValueError:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "page_token: not a token this server issued",
            )
        events = await self._events.list(event_filter, after, size + 1)
        page = events[:size]
        next_token = _paging.encode_token(str(page[-1].event_id)) if len(events) > size else ""
        return events_pb2.ListEventsResponse(
            events=[event_message(e) for e in page], next_page_token=next_token
        )
