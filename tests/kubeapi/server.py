"""`KubeApiServer`: a Kubernetes API test server over plain HTTP on loopback, in background
threads, with a simulated controller ticking next to it. The HTTP layer here only carries bytes;
the API behaviour lives in `_api`, the state in `_cluster`."""

from __future__ import annotations

import contextlib
import http.server
import json
import select
import socket
import sys
import threading
import urllib.parse
from types import TracebackType
from typing import Any

from tests.kubeapi._api import ApiRequest, KubeApi, Reply
from tests.kubeapi._cluster import Cluster
from tests.kubeapi._watch import Watch

_REASONS = {201: "Created", 401: "Unauthorized", 422: "Unprocessable Entity"}


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: KubeApiServer) -> None:
        self.owner = owner
        self.stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a client that went away mid-answer (or a cut connection at stop)
        super().handle_error(request, client_address)

    def drop_connections(self) -> None:
        """Cuts every open connection, kept-alive and watching ones included."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # As a real API server does: watch events and small answers go out at once, not after
    # the client's delayed ACK (Nagle), which would add up to 40 ms to every reaction.
    disable_nagle_algorithm = True
    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the cluster keeps its own request log

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0] or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        if self.server.stopping.is_set():
            self.close_connection = True
            return
        url = urllib.parse.urlsplit(self.path)
        query = {
            k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()
        }
        request = ApiRequest(
            method=self.command,
            path=url.path,
            query=query,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=self._read_body(),
        )
        reply = self.server.owner.api.handle(request)
        if isinstance(reply, Watch):
            self._stream(reply)
        else:
            self._reply(reply)

    def _reply(self, reply: Reply) -> None:
        data = json.dumps(reply.body).encode()
        self.send_response(reply.code, _REASONS.get(reply.code))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, watch: Watch) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(event: dict[str, Any]) -> None:
            data = json.dumps(event).encode() + b"\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        try:
            watch.run(send, self._client_gone, self.server.stopping.is_set)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass
        self.close_connection = True

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


class KubeApiServer:
    """A Kubernetes API server for tests: real REST paths and JSON over HTTP on 127.0.0.1, the
    state in `cluster`, and a controller stepping every `tick_seconds` (None: only when a test
    calls `cluster.tick()`). `stop()` makes it unreachable; `start()` brings it back on the same
    port with the same state."""

    def __init__(
        self,
        cluster: Cluster | None = None,
        *,
        tick_seconds: float | None = 0.05,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.cluster = cluster if cluster is not None else Cluster()
        self.api = KubeApi(self.cluster, lambda: f"{self._host}:{self.port}")
        self._host = host
        self._port = port
        self._tick_seconds = tick_seconds
        self._http: _HttpServer | None = None
        self._threads: list[threading.Thread] = []
        self._ticker_stop = threading.Event()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._http is not None

    def start(self) -> KubeApiServer:
        if self._http is not None:
            return self
        self._http = _HttpServer((self._host, self._port), self)
        self._port = self._http.server_address[1]
        serve = threading.Thread(
            target=self._http.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"kubeapi-{self._port}",
            daemon=True,
        )
        self._threads = [serve]
        self._ticker_stop.clear()
        if self._tick_seconds is not None:
            ticker = threading.Thread(
                target=self._tick_forever, name=f"kubeapi-controller-{self._port}", daemon=True
            )
            self._threads.append(ticker)
        for thread in self._threads:
            thread.start()
        return self

    def _tick_forever(self) -> None:
        assert self._tick_seconds is not None
        while not self._ticker_stop.wait(self._tick_seconds):
            self.cluster.tick()

    def stop(self) -> None:
        """Stops serving and cuts open connections (watches end); the state is kept."""
        http_server, self._http = self._http, None
        if http_server is None:
            return
        self._ticker_stop.set()
        http_server.stopping.set()
        http_server.shutdown()
        with self.cluster.store.lock:
            self.cluster.store.changed.notify_all()
        http_server.drop_connections()
        http_server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    def __enter__(self) -> KubeApiServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


__all__ = ["KubeApiServer"]
