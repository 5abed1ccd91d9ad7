"""`TelemetryService`: latest samples and filtered live streams of them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
from google.protobuf import descriptor
from sentinel.v1 import telemetry_pb2, telemetry_pb2_grpc

from controlplane.api import _paging
from controlplane.api._errors import abort
from controlplane.settings import ControlPlaneSettings
from controlplane.telemetry import SubscriberTooSlow, TelemetryHub, TelemetryRelay

_SAMPLE = telemetry_pb2.TelemetrySample.DESCRIPTOR
_ALWAYS_KEPT = ("seq", "node_id", "collect_time")
_GPU_IDENTITY = ("index", "uuid")


class MetricFilter:
    """Keeps only the requested field paths of a sample (a path through `gpus` applies to each
    GPU). Paths are checked against the schema up front, so typos are INVALID_ARGUMENT."""

    def __init__(self, paths: Sequence[str]) -> None:
        self._tree: dict[str, dict[str, object]] = {}
        for i, path in enumerate(paths):
            message_type: descriptor.Descriptor | None = _SAMPLE
            node = self._tree
            for part in path.split("."):
                if message_type is None or part not in message_type.fields_by_name:
                    raise ValueError(f"metrics[{i}]: unknown telemetry field path {path!r}")
                field = message_type.fields_by_name[part]
                node = node.setdefault(part, {})  # type: ignore[assignment]
                message_type = field.message_type
        if self._tree.get("gpus"):
            for name in _GPU_IDENTITY:
                self._tree["gpus"].setdefault(name, {})

    def apply(self, sample: telemetry_pb2.TelemetrySample) -> telemetry_pb2.TelemetrySample:
        if not self._tree:
            return sample
        out = telemetry_pb2.TelemetrySample()
        for name in _ALWAYS_KEPT:
            self._copy(sample, out, name, {})
        for name, sub in self._tree.items():
            self._copy(sample, out, name, sub)
        return out

    def _copy(self, src: object, dst: object, name: str, sub: dict[str, object]) -> None:
        field = src.DESCRIPTOR.fields_by_name[name]  # type: ignore[attr-defined]
        value = getattr(src, name)
        if field.message_type is None:
            if field.is_repeated:
                getattr(dst, name).extend(value)
            else:
                setattr(dst, name, value)
        elif field.is_repeated:
            for item in value:
                target = getattr(dst, name).add()
                if sub:
                    for child, grand in sub.items():
                        self._copy(item, target, child, grand)  # type: ignore[arg-type]
                else:
                    target.CopyFrom(item)
        elif src.HasField(name):  # type: ignore[attr-defined]
            target = getattr(dst, name)
            if sub:
                target.SetInParent()
                for child, grand in sub.items():
                    self._copy(value, target, child, grand)  # type: ignore[arg-type]
            else:
                target.CopyFrom(value)


class TelemetryService(telemetry_pb2_grpc.TelemetryServiceServicer):
    """Latest samples per node and live streams of them, with node and metric filters."""

    def __init__(
        self,
        settings: ControlPlaneSettings,
        hub: TelemetryHub[telemetry_pb2.TelemetrySample],
        relay: TelemetryRelay[telemetry_pb2.TelemetrySample] | None = None,
    ) -> None:
        self._settings = settings
        self._hub = hub
        self._relay = relay

    async def GetNodeTelemetry(
        self, request: telemetry_pb2.GetNodeTelemetryRequest, context: grpc.aio.ServicerContext
    ) -> telemetry_pb2.GetNodeTelemetryResponse:
        if not request.node_id:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "node_id: required")
        if self._relay is not None:
            # A node held by another replica: have its latest sample relayed here first.
            await self._relay.fresh((request.node_id,))
        sample = self._hub.latest(request.node_id)
        if sample is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"node_id: no telemetry from {request.node_id!r} since the control plane started",
            )
        return telemetry_pb2.GetNodeTelemetryResponse(sample=sample.payload)

    async def GetFleetTelemetry(
        self, request: telemetry_pb2.GetFleetTelemetryRequest, context: grpc.aio.ServicerContext
    ) -> telemetry_pb2.GetFleetTelemetryResponse:
        if self._relay is not None:
            await self._relay.fresh(request.node_ids)
        try:
            page, token = _paging.paginate(
                self._hub.latest_all(request.node_ids),
                lambda s: s.node_id,
                request.page_size,
                request.page_token,
            )
        except _paging.PageError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return telemetry_pb2.GetFleetTelemetryResponse(
            samples=[s.payload for s in page], next_page_token=token
        )

    async def StreamTelemetry(
        self, request: telemetry_pb2.StreamTelemetryRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[telemetry_pb2.StreamTelemetryResponse]:
        try:
            metric_filter = MetricFilter(request.metrics)
        except ValueError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            async for sample in self._hub.subscribe(
                request.node_ids,
                include_latest=request.include_latest,
                max_backlog=self._settings.subscriber_queue,
            ):
                yield telemetry_pb2.StreamTelemetryResponse(
                    sample=metric_filter.apply(sample.payload)
                )
        except SubscriberTooSlow as exc:
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{exc}; read faster or filter more, then retry",
            )
