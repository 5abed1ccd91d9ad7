"""Tracing with OpenTelemetry: installs the SDK's tracer provider and exporter when tracing is
on, and gives the gRPC server its span-per-call interceptor. Off by default; then the SDK is
never imported and every span the domain starts is the API's no-op span (docs/tracing.md).

The domain (plans, executors) imports only the OpenTelemetry API (`opentelemetry.trace`) and
starts its spans through the process-wide provider installed here."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

EXPORTERS = ("otlp", "console")
"""Where spans can go: the OTLP/gRPC exporter (configured by OTEL_EXPORTER_OTLP_*) or stdout."""

SERVICE_NAME = "sentinel-controlplane"
"""`service.name` of the spans unless OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES) says."""

UNTRACED_METHODS = frozenset(
    {
        # The agent's session: one stream for hours, its handler writes through the context
        # (which the instrumentation's stream wrapper cannot wrap), and telemetry rides on it;
        # what matters on it, commands, is traced as the plans' `command` spans.
        "/sentinel.v1.AgentService/Connect",
        # Probes: noise.
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
    }
)

_provider: TracerProvider | None = None


def tracing_exporter(setting: str, environ: Mapping[str, str] = os.environ) -> str:
    """The exporter the `tracing` setting asks for, or "" when tracing is off (the setting is
    empty or `off`, or OTEL_SDK_DISABLED=true). Raises ValueError for an unknown exporter."""
    choice = setting.strip().lower()
    if choice in ("", "off", "none"):
        return ""
    if choice not in EXPORTERS:
        raise ValueError(f"tracing: {setting!r} is not one of off, {', '.join(EXPORTERS)}")
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        log.info("tracing is off: OTEL_SDK_DISABLED=true")
        return ""
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    )
    if choice == "otlp" and protocol.strip().lower() != "grpc":
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: only grpc is installed "
            "(opentelemetry-exporter-otlp-proto-grpc); point it at a collector's gRPC port"
        )
    return choice


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    # Endpoint, headers, TLS, compression and timeout come from OTEL_EXPORTER_OTLP_*.
    return OTLPSpanExporter()


def install_provider(
    exporter: SpanExporter, *, instance_id: str = "", batch: bool = True
) -> TracerProvider:
    """Installs the process-wide SDK tracer provider exporting to `exporter` (batched, as
    OTEL_BSP_* say, unless `batch` is false: each span exported as it ends, for tests).

    OpenTelemetry allows one global provider per process: the first call installs it; a later
    one adds its exporter to it. The sampler is the SDK's, from OTEL_TRACES_SAMPLER (default:
    parent-based, always on)."""
    global _provider
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    if _provider is None:
        resource = Resource.create({"service.instance.id": instance_id} if instance_id else {})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
        provider = TracerProvider(resource=resource)
        trace.set_tracer_provider(provider)
        _provider = provider
    _provider.add_span_processor(processor)
    return _provider


class Tracing:
    """One control plane's tracing: whether it is on, the server interceptor, flushing."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self._provider = provider

    @property
    def enabled(self) -> bool:
        return self._provider is not None

    def server_interceptors(self) -> list[Any]:
        """The span-per-call interceptor, to go first (outermost) on the server, so that a
        call's span covers authentication and auditing and refused calls are traced with their
        status; none when tracing is off (a no-op span per call still costs a little)."""
        if self._provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        def traced(details: Any) -> bool:
            return details.method not in UNTRACED_METHODS

        interceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self._provider, filter_=traced
        )
        return [interceptor]

    def flush(self, timeout_s: float = 5.0) -> None:
        """Exports what has ended (at shutdown; the SDK shuts down at process exit)."""
        if self._provider is not None:
            self._provider.force_flush(int(timeout_s * 1000))


def start_tracing(
    setting: str, *, instance_id: str, environ: Mapping[str, str] = os.environ
) -> Tracing:
    """Tracing as the `tracing` setting and the OTEL_* variables say: off (nothing imported,
    nothing installed), or the SDK's provider exporting to the chosen exporter. A provider
    already installed in this process (by an embedding program or a test) is used as it is."""
    name = tracing_exporter(setting, environ)
    if not name:
        return Tracing(None)
    if _provider is not None:
        return Tracing(_provider)
    provider = install_provider(_exporter(name), instance_id=instance_id)
    log.info("tracing on: spans go to the %s exporter", name)
    return Tracing(provider)
