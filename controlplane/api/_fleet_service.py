"""`FleetService`: read-only views of the fleet registry."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from sentinel.v1 import fleet_pb2, fleet_pb2_grpc

from controlplane.api import _convert, _paging
from controlplane.api._errors import abort
from controlplane.fleet import AgentRegistry, WatcherOverflow


class FleetService(fleet_pb2_grpc.FleetServiceServicer):
    """Reads the fleet registry: list, get and watch agents."""

    def __init__(self, registry: AgentRegistry) -> None:
        self._registry = registry

    async def ListAgents(
        self, request: fleet_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.ListAgentsResponse:
        if request.status not in (fleet_pb2.AGENT_STATUS_UNSPECIFIED, *_convert.STATUS_FROM_PB):
            await abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"status: unknown value {request.status}"
            )
        status = _convert.STATUS_FROM_PB.get(request.status)
        try:
            page, token = _paging.paginate(
                self._registry.agents(status),
                lambda a: a.node_id,
                request.page_size,
                request.page_token,
            )
        except _paging.PageError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return fleet_pb2.ListAgentsResponse(
            agents=[_convert.agent_message(a) for a in page], next_page_token=token
        )

    async def GetAgent(
        self, request: fleet_pb2.GetAgentRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.GetAgentResponse:
        if not request.node_id:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "node_id: required")
        state = self._registry.get(request.node_id)
        if state is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"node_id: no agent {request.node_id!r} ever registered",
            )
        return fleet_pb2.GetAgentResponse(agent=_convert.agent_message(state))

    async def WatchAgents(
        self, request: fleet_pb2.WatchAgentsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fleet_pb2.WatchAgentsResponse]:
        try:
            async for state in self._registry.watch():
                yield fleet_pb2.WatchAgentsResponse(agent=_convert.agent_message(state))
        except WatcherOverflow as exc:
            await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; watch again")
