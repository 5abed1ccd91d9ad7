"""The plaintext health port: `grpc.health.v1.Health` alone, for probes that speak no TLS.

Kubernetes' native gRPC probes cannot present a certificate, so they cannot reach the mTLS
port. This port serves the control plane's own health servicer and nothing else (no reflection,
no API service), so what a probe reads here is exactly what the main port reports.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2_grpc

log = logging.getLogger(__name__)


class HealthPort:
    """A plaintext gRPC server carrying only the control plane's Health service."""

    def __init__(self, servicer: health.aio.HealthServicer, listen: str) -> None:
        self._servicer = servicer
        self._listen = listen
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        """Starts serving; returns the bound port (`listen` may ask for port 0)."""
        server = grpc.aio.server(
            # A second process on the same port must fail loudly, as on the main port.
            options=[("grpc.so_reuseport", 0)],
            # Probes ask one question at a time; a few threads' worth of streams is plenty.
            maximum_concurrent_rpcs=64,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)
        self.port = server.add_insecure_port(self._listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self._listen} (address in use?)")
        await server.start()
        self._server = server
        log.info("health port %d serving grpc.health.v1 in plaintext", self.port)
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Stops serving; open Watch streams get `grace_s` to end."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
