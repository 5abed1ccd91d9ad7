"""What the replica tests share: a switchable L4 forwarder standing in for the load balancer,
and control-plane replicas as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import Pki


class Forwarder:
    """A TCP forwarder on loopback that sends new connections to one backend port, which the
    test switches (as a load balancer would after a health check failed). TLS passes through
    untouched."""

    def __init__(self, backend: int) -> None:
        self.backend = backend
        self.cut = False
        """While set, open connections are dropped and new ones closed at once (a partition)."""
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def partition(self) -> None:
        """Cuts the link: every open connection is reset, new ones are refused."""
        self.cut = True
        for writer in list(self._writers):
            writer.transport.abort()

    def heal(self) -> None:
        self.cut = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backend)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink, (writer, up_writer)))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        for writer in pair:
            writer.close()
            self._writers.discard(writer)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_replica(
    pki: Pki, database_url: str, log: Path, port: int, replica_id: str, *extra: str
) -> subprocess.Popen[bytes]:
    """A `sentinel-controlplane` process with the tests' short timers."""
    bin_dir = Path(sys.executable).parent
    with log.open("a") as out:
        return subprocess.Popen(
            [
                str(bin_dir / "sentinel-controlplane"),
                "--certs-dir",
                str(pki.directory),
                "--listen",
                f"127.0.0.1:{port}",
                "--metrics-listen",
                "",
                "--enrollment-listen",
                "",
                "--database-url",
                database_url,
                "--controller-id",
                replica_id,
                "--telemetry-interval-s",
                "0.2",
                "--heartbeat-interval-s",
                "0.5",
                "--telemetry-flush-interval-s",
                "0.05",
                "--telemetry-ack-interval-s",
                "0",
                "--shutdown-grace-s",
                "0.5",
                "--reconnect-after-shutdown-s",
                "0.1",
                "--reconnect-after-shutdown-spread-s",
                "0.1",
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
