"""What the client tests share: settings for an identity of the test PKI, and a TCP proxy on
loopback that can hold back the server's answers and cut connections, to lose a response the
way a network does."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from sentinelclient import ConnectionSettings, RetryPolicy
from tests.conftest import Pki

FAST_RETRIES = RetryPolicy(max_attempts=4, initial_backoff_s=0.05, max_backoff_s=0.2)


def settings_for(
    pki: Pki, port: int, role: str = "planner", name: str = "inframind", **overrides: Any
) -> ConnectionSettings:
    """Settings naming the identity's files explicitly (as a deployment would)."""
    cert, key = pki.client(role, name)
    return ConnectionSettings(
        server=f"localhost:{port}",
        ca=pki.ca_path,
        cert=cert,
        key=key,
        retry=FAST_RETRIES,
        **overrides,
    )


class LossyProxy:
    """Forwards TCP connections on loopback to the control plane. While `holding`, bytes from
    the server are dropped (the request arrives, its answer never does); `sever()` aborts every
    open connection and forwards normally from then on."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._server: asyncio.Server | None = None
        self._open: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._handlers: set[asyncio.Task[Any]] = set()
        self.holding = False
        self.connections = 0
        self.held_bytes = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, from_server: bool
    ) -> None:
        try:
            while data := await source.read(65536):
                if from_server and self.holding:
                    self.held_bytes += len(data)
                    continue
                sink.write(data)
                await sink.drain()
        except ConnectionError:
            pass
        finally:
            sink.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self._target_port)
            self._open.append((client_w, server_w))
            await asyncio.gather(
                self._pump(client_r, server_w, from_server=False),
                self._pump(server_r, client_w, from_server=True),
            )
        finally:
            self._handlers.discard(task)

    def sever(self) -> None:
        """Aborts every open connection (the client sees the connection reset)."""
        self.holding = False
        for client_w, server_w in self._open:
            client_w.transport.abort()
            server_w.transport.abort()
        self._open.clear()

    async def close(self) -> None:
        self.sever()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._handlers):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._handlers, return_exceptions=True)
