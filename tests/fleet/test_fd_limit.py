"""The open-files limit: the control plane raises its soft limit to the hard limit at start,
derives how many agent sessions fit, and refuses the rest like a full replica (UNAVAILABLE with
a retry-after) instead of running out of descriptors. The real `controlplane.main` runs as a
process under a low limit; agents are raw mTLS sessions on loopback, one connection each."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import resource
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from sentinel.v1 import agent_pb2, agent_pb2_grpc, fleet_pb2, fleet_pb2_grpc

from controlplane._fds import (
    OpenFilesLimit,
    SessionRoom,
    describe,
    effective_session_limit,
    raise_open_files_limit,
)
from tests.conftest import Pki, eventually
from tests.processes.test_processes import _free_port, _metrics

pytestmark = pytest.mark.timeout(60)

# Lowers RLIMIT_NOFILE (always allowed) and execs the rest of argv: the child starts under the
# limit from its first instruction, and no preexec_fn runs in this threaded test process.
_UNDER_LIMIT = (
    "import os, resource, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); "
    "os.execv(sys.argv[3], sys.argv[3:])"
)
SOFT, HARD = 100, 120
"""The limits the control plane starts under: it raises the soft one to HARD, and HARD less what
it opens at start (about 20) less the reserve (64) leaves room for a few dozen sessions."""
REFUSED_BATCH = 16
"""Agents knocking at once on the full replica: each holds a descriptor until it is refused,
so a batch must fit in the reserve."""


def _under_limit(soft: int, hard: int, *argv: str) -> list[str]:
    return [sys.executable, "-c", _UNDER_LIMIT, str(soft), str(hard), *argv]


class _Session:
    """One agent's session on its own channel (so its own TCP connection and descriptor)."""

    def __init__(self, pki: Pki, port: int, node_id: str) -> None:
        self.channel = grpc.aio.secure_channel(
            f"localhost:{port}", pki.channel_credentials("agent", node_id)
        )
        self.call = agent_pb2_grpc.AgentServiceStub(self.channel).Connect()
        self.node_id = node_id

    async def open(self) -> agent_pb2.ConnectResponse:
        """Sends the hello and returns the first answer (the welcome), or raises the refusal."""
        await self.call.write(agent_pb2.ConnectRequest(hello=agent_pb2.Hello(node_id=self.node_id)))
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for's inner task and the raised
        # status form a reference cycle that keeps the call, and so its connection, open after
        # the channel is closed, until the garbage collector next runs.
        async with asyncio.timeout(10):
            first: agent_pb2.ConnectResponse = await self.call.read()
        return first

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


@dataclasses.dataclass(frozen=True)
class _Refusal:
    code: grpc.StatusCode
    details: str
    trailers: dict[str, str | bytes]


async def _refusal(pki: Pki, port: int, node_id: str) -> _Refusal:
    session = _Session(pki, port, node_id)
    try:
        await session.open()
    except grpc.aio.AioRpcError as exc:
        # Copied out: the exception's traceback would keep the call, and so its connection,
        # alive after the channel is closed.
        return _Refusal(exc.code(), exc.details() or "", dict(exc.trailing_metadata() or ()))
    finally:
        # As the agent does: the channel (and the server's descriptor) goes with the attempt.
        await session.close()
    raise AssertionError(f"{node_id} was welcomed")


def _start(
    pki: Pki, database_url: str, log: Path, soft: int, hard: int
) -> tuple[subprocess.Popen[bytes], int, int]:
    port, metrics_port = _free_port(), _free_port()
    with log.open("w") as stderr:
        process = subprocess.Popen(
            _under_limit(
                soft,
                hard,
                sys.executable,
                "-m",
                "controlplane.main",
                "--certs-dir",
                str(pki.directory),
                "--listen",
                f"127.0.0.1:{port}",
                "--metrics-listen",
                f"127.0.0.1:{metrics_port}",
                "--enrollment-listen",
                "127.0.0.1:0",
                "--database-url",
                database_url,
                "--log-format",
                "json",
            ),
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    return process, port, metrics_port


@contextlib.asynccontextmanager
async def _control_plane(
    pki: Pki, database_url: str, log: Path, soft: int, hard: int
) -> AsyncIterator[tuple[int, int]]:
    """`python -m controlplane.main` under the given limits, logging JSON to `log`; stopped
    with SIGTERM, and it must exit cleanly."""
    process, port, metrics_port = _start(pki, database_url, log, soft, hard)
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 30)
        assert b"listening" in line, line
        yield port, metrics_port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(process.wait, 15)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        assert code == 0, f"exit code {code}"


async def test_sessions_beyond_the_open_files_limit_are_refused_with_retry_after(
    pki: Pki, database_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "controlplane.log"
    async with _control_plane(pki, database_url, log, SOFT, HARD) as (port, metrics_port):
        text = await asyncio.to_thread(log.read_text)
        records = [json.loads(line) for line in text.splitlines()]
        said = [r["message"] for r in records if r["message"].startswith("open files:")]
        assert len(said) == 1, said
        assert f"soft limit raised {SOFT} -> {HARD}" in said[0]
        found = re.search(r"room for about ([\d,]+) agent sessions \(max_agents 0\)", said[0])
        assert found, said[0]
        room = int(found[1].replace(",", ""))
        assert 10 <= room <= HARD - 64, said[0]

        held = [_Session(pki, port, f"fd-node-{i:03d}") for i in range(room)]
        try:
            for batch in range(0, room, 8):
                welcomes = await asyncio.gather(*(s.open() for s in held[batch : batch + 8]))
                assert all(w.HasField("welcome") for w in welcomes)

            # More agents knock than the process has descriptors left (in batches, as refused
            # agents close their connection and come back later): every one is refused, none
            # makes the server run out.
            extra = [f"fd-extra-{i:03d}" for i in range(REFUSED_BATCH * (HARD // REFUSED_BATCH))]
            assert room + len(extra) > HARD
            refusals: list[_Refusal] = []
            for batch in range(0, len(extra), REFUSED_BATCH):
                refusals += await asyncio.gather(
                    *(_refusal(pki, port, n) for n in extra[batch : batch + REFUSED_BATCH])
                )
            for refusal in refusals:
                assert refusal.code == grpc.StatusCode.UNAVAILABLE, refusal
                details = refusal.details
                assert "open-files limit" in details and f"{room} agent sessions" in details
                assert "ulimit -n" in details
                retry_ms = int(refusal.trailers["retry-after-ms"])
                assert 5000 <= retry_ms <= 10000  # capacity_retry_after_s 5, drawn up to 2x

            # Operators are still answered on a full replica.
            async with grpc.aio.secure_channel(
                f"localhost:{port}", pki.channel_credentials("operator", "alice")
            ) as channel:
                listed = await fleet_pb2_grpc.FleetServiceStub(channel).ListAgents(
                    fleet_pb2.ListAgentsRequest(), timeout=10
                )
            connected = [a for a in listed.agents if a.status == fleet_pb2.AGENT_STATUS_CONNECTED]
            assert len(connected) == room

            values = await asyncio.to_thread(_metrics, metrics_port)
            assert values["sentinel_agent_sessions_capacity{}"] == room
            refused = 'sentinel_agent_sessions_refused_total{"reason": "fd_limit"}'
            assert values[refused] == len(extra)

            # A session that ends makes room: a refused agent coming back is let in.
            await held.pop().close()

            async def comes_in() -> bool:
                session = _Session(pki, port, extra[0])
                try:
                    welcome = await session.open()
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    await session.close()
                    return False
                held.append(session)
                return welcome.HasField("welcome")

            await eventually(comes_in, timeout=10, interval=0.2)
        finally:
            await asyncio.gather(*(s.close() for s in held))

    # What gRPC's accept loop logs when it runs out ("File descriptor limit reached.
    # Retrying.") or what a failed open says.
    output = (await asyncio.to_thread(log.read_text)).lower()
    assert "file descriptor limit" not in output
    assert "too many open files" not in output


def test_a_process_started_with_a_low_soft_limit_raises_it_to_the_hard_limit() -> None:
    script = (
        "import json, resource; from controlplane._fds import raise_open_files_limit; "
        "raised = raise_open_files_limit(); "
        "print(json.dumps([raised.found, raised.soft, raised.hard, raised.problem, "
        "resource.getrlimit(resource.RLIMIT_NOFILE)]))"
    )
    out = subprocess.run(
        _under_limit(64, 200, sys.executable, "-c", script),
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert json.loads(out.stdout) == [64, 200, 200, "", [200, 200]]


def test_the_lesser_of_max_agents_and_the_open_files_room_binds() -> None:
    def room(sessions: int | None) -> SessionRoom:
        return SessionRoom(OpenFilesLimit(1024, 20_000, 20_000), 40, 1000, sessions)

    assert effective_session_limit(0, room(18_960)) == (18_960, "fd_limit")
    assert effective_session_limit(50_000, room(18_960)) == (18_960, "fd_limit")
    assert effective_session_limit(6_000, room(18_960)) == (6_000, "capacity")
    assert effective_session_limit(0, room(None)) == (None, "capacity")
    assert effective_session_limit(0, None) == (None, "capacity")
    assert effective_session_limit(0, room(0)) == (0, "fd_limit")


def test_the_start_up_line_says_what_the_limit_allows_and_warns_when_it_binds() -> None:
    level, line = describe(SessionRoom(OpenFilesLimit(1024, 20_000, 20_000), 40, 1000, 18_960), 0)
    assert line == (
        "open files: soft limit raised 1024 -> 20000; 40 open at start, 1000 kept in reserve: "
        "room for about 18,960 agent sessions (max_agents 0)"
    )
    assert level == logging.INFO
    level, line = describe(SessionRoom(OpenFilesLimit(1024, 1024, 1024), 40, 64, 920), 6000)
    assert level == logging.WARNING and "sessions beyond 920 are refused" in line
    level, line = describe(SessionRoom(OpenFilesLimit(64, 64, 64), 40, 64, 0), 0)
    assert level == logging.ERROR and "every agent session will be refused" in line


def test_an_unlimited_hard_limit_raises_the_soft_limit_only_as_far_as_the_kernel_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # setrlimit refuses a soft limit above fs.nr_open, so "unlimited" means nr_open.
    limits = {resource.RLIMIT_NOFILE: (1024, resource.RLIM_INFINITY)}
    monkeypatch.setattr(resource, "getrlimit", limits.__getitem__)
    monkeypatch.setattr(resource, "setrlimit", limits.__setitem__)
    raised = raise_open_files_limit()
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    assert (raised.found, raised.soft, raised.problem) == (1024, min(nr_open, 1_048_576), "")
    assert limits[resource.RLIMIT_NOFILE] == (raised.soft, resource.RLIM_INFINITY)
