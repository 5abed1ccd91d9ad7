"""A small L4 (TCP) round-robin proxy for running several control planes behind one address
on one machine, as a load balancer or a Kubernetes Service would in production.

Each accepted connection goes to the next backend in turn; a backend whose connect fails is
skipped for that connection (the next one is tried, until all have been). Bytes are copied
untouched both ways, so TLS passes through: the client's handshake is with the control plane,
whose certificate must name the proxy's address. Standard library only.

    python scripts/l4proxy.py --listen 127.0.0.1:7443 127.0.0.1:17443 127.0.0.1:17444
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import signal
from collections.abc import Sequence

log = logging.getLogger("l4proxy")

CONNECT_TIMEOUT_S = 3.0
CHUNK = 64 * 1024


def parse_address(text: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port` for IPv6) as (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


class RoundRobinProxy:
    """Accepts TCP connections and joins each to the next backend that accepts a connect."""

    def __init__(self, backends: Sequence[tuple[str, int]]) -> None:
        if not backends:
            raise ValueError("at least one backend is needed")
        self.backends = list(backends)
        self._turn = itertools.cycle(range(len(self.backends)))
        self._pipes: set[asyncio.Task[None]] = set()
        self.connections = [0] * len(self.backends)
        """Connections handed to each backend so far."""

    async def _open_backend(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        # One full turn at most, starting at the next backend in the rotation.
        for _ in self.backends:
            index = next(self._turn)
            host, port = self.backends[index]
            try:
                streams = await asyncio.wait_for(
                    asyncio.open_connection(host, port), CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError) as exc:
                log.warning("backend %s:%d refused a connection (%s): skipped", host, port, exc)
                continue
            self.connections[index] += 1
            return streams
        return None

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        """Joins one client connection to a backend until either side closes."""
        task = asyncio.current_task()
        if task is not None:
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)
        try:
            backend = await self._open_backend()
            if backend is None:
                log.error("no backend accepted a connection; closing the client's")
                return
            backend_r, backend_w = backend
            try:
                await asyncio.gather(_pipe(client_r, backend_w), _pipe(backend_r, client_w))
            finally:
                await _close(backend_w)
        except asyncio.CancelledError:
            # Only close_connections cancels a handler, and that is the end of it; asyncio's
            # stream callback on Python 3.11 would log a cancelled handler as an error.
            pass
        finally:
            await _close(client_w)

    async def close_connections(self) -> None:
        """Ends every open connection (the listening socket is the server's to close)."""
        pipes = list(self._pipes)
        for task in pipes:
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copies bytes until end of stream, then half-closes the other side (TLS close_notify and
    gRPC's own shutdown then travel as they would without the proxy)."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


async def start(
    listen: tuple[str, int], backends: Sequence[tuple[str, int]]
) -> tuple[asyncio.Server, RoundRobinProxy]:
    """Starts the proxy on `listen` (port 0 picks a free one); returns the listening server
    and the proxy, whose `close_connections` ends what is open."""
    proxy = RoundRobinProxy(backends)
    server = await asyncio.start_server(proxy.handle, listen[0], listen[1])
    return server, proxy


async def _serve(listen: tuple[str, int], backends: Sequence[tuple[str, int]]) -> None:
    server, proxy = await start(listen, backends)
    port = server.sockets[0].getsockname()[1]
    names = ", ".join(f"{h}:{p}" for h, p in backends)
    print(f"l4proxy listening on {listen[0]}:{port} -> {names}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()
    await proxy.close_connections()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="l4proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:7443", help="host:port to accept on")
    parser.add_argument("backends", nargs="+", help="host:port of each backend")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(_serve(parse_address(args.listen), [parse_address(b) for b in args.backends]))


if __name__ == "__main__":
    main()
