"""Telemetry delivery across control plane restarts: the gap arrives, none missing, none doubled."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator

import grpc
from sentinel.v1 import telemetry_pb2, telemetry_pb2_grpc

from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually


@contextlib.asynccontextmanager
async def stream_seqs(pki: Pki, port: int, node_id: str) -> AsyncIterator[list[int]]:
    """Collects the seqs a StreamTelemetry subscriber sees, as a user of the API would."""
    seen: list[int] = []
    channel = grpc.aio.secure_channel(
        f"localhost:{port}", pki.channel_credentials("planner", "inframind")
    )
    call = telemetry_pb2_grpc.TelemetryServiceStub(channel).StreamTelemetry(
        telemetry_pb2.StreamTelemetryRequest(node_ids=[node_id], metrics=["host.load"])
    )

    async def consume() -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for response in call:
                seen.append(response.sample.seq)

    task = asyncio.create_task(consume())
    await call.wait_for_connection()
    try:
        yield seen
    finally:
        call.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await channel.close()


def assert_contiguous(seqs: list[int]) -> None:
    assert len(seqs) == len(set(seqs)), f"duplicates: {sorted(seqs)}"
    assert sorted(seqs) == list(range(min(seqs), max(seqs) + 1)), f"missing: {sorted(seqs)}"


async def test_agent_resends_gap_after_graceful_restart(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    # The first control plane tells agents to come back after 2 s: time to start the second one
    # and subscribe before the agent returns with the samples of the gap.
    first = await control_plane_factory(reconnect_after_shutdown_s=2.0)
    port = first.port
    node = await agent_factory("node-1", port)
    async with stream_seqs(pki, port, "node-1") as before:
        await eventually(lambda: len(before) >= 5)
        await first.stop()
    seen_before = list(before)

    second = await control_plane_factory(listen=f"127.0.0.1:{port}")
    async with stream_seqs(pki, port, "node-1") as after:
        await eventually(lambda: node.agent.connected.is_set(), timeout=15)
        produced_during_gap = node.agent.last_sample.seq
        await eventually(lambda: after and max(after) >= produced_during_gap + 3)
    all_seqs = seen_before + list(after)
    assert_contiguous(all_seqs)
    assert min(all_seqs) == 1
    # Samples taken while no control plane was up came through the second one.
    assert max(seen_before) + 1 in after
    agent_state = second.registry.get("node-1")
    assert agent_state is not None and agent_state.telemetry_gap_samples == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_process(pki: Pki, port: int, database_url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controlplane.main",
            "--certs-dir",
            str(pki.directory),
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-listen",
            "",
            "--enrollment-listen",
            "127.0.0.1:0",
            "--database-url",
            database_url,
            "--telemetry-interval-s",
            "0.2",
            "--telemetry-flush-interval-s",
            "0.05",
            "--telemetry-ack-interval-s",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


async def _wait_listening(process: subprocess.Popen[bytes]) -> None:
    assert process.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 30)
    assert b"listening" in line, line


async def test_agent_survives_sigkill_of_control_plane_without_loss_or_duplicates(
    pki: Pki, database_url: str, agent_factory: AgentFactory
) -> None:
    port = _free_port()
    process = _start_process(pki, port, database_url)
    try:
        await _wait_listening(process)
        node = await agent_factory("node-1", port)
        async with stream_seqs(pki, port, "node-1") as before:
            await eventually(lambda: len(before) >= 5)
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
        # The agent keeps collecting into its spool while nothing listens.
        gap_start = node.agent.last_sample.seq
        await eventually(lambda: node.agent.last_sample.seq >= gap_start + 5)
        process = _start_process(pki, port, database_url)
        await _wait_listening(process)
        async with stream_seqs(pki, port, "node-1") as after:
            await eventually(lambda: node.agent.connected.is_set(), timeout=15)
            target = node.agent.last_sample.seq + 3
            await eventually(lambda: after and max(after) >= target, timeout=15)
        # Whatever the first process published it had stored; the second dropped re-sends of
        # those by seq, and took the rest: together one unbroken run.
        assert_contiguous(list(before) + list(after))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
