"""Telemetry delivery across control plane restarts: the gap arrives, none missing, none doubled."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from sentinel.v1 import telemetry_pb2, telemetry_pb2_grpc

from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually
from tests.processes.test_processes import _metrics as scrape_metrics


@contextlib.asynccontextmanager
async def stream_seqs(
    pki: Pki, port: int, node_id: str, subscribers: Callable[[], Any]
) -> AsyncIterator[list[int]]:
    """Collects the seqs a StreamTelemetry subscriber sees, as a user of the API would. The
    body runs once the server counts the subscription (`subscribers()`, which may be a
    coroutine): from then on it misses nothing."""
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
    try:
        await eventually(subscribers)
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
    first = await control_plane_factory()
    port = first.port
    node = await agent_factory("node-1", port)
    async with stream_seqs(pki, port, "node-1", lambda: first.hub.subscriber_count) as before:
        await eventually(lambda: len(before) >= 5)
        await first.stop()
    seen_before = list(before)
    # While no control plane is up the agent goes on sampling into its spool: the gap. It is
    # then stopped, so that it returns only once the second control plane has a subscriber.
    await eventually(lambda: node.agent.last_sample.seq >= max(seen_before) + 3)
    await node.stop()
    produced_during_gap = node.agent.last_sample.seq

    second = await control_plane_factory(listen=f"127.0.0.1:{port}")
    async with stream_seqs(pki, port, "node-1", lambda: second.hub.subscriber_count) as after:
        await agent_factory("node-1", port)
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


def _start_process(
    pki: Pki, port: int, database_url: str, metrics_port: int | None = None
) -> subprocess.Popen[bytes]:
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
            f"127.0.0.1:{metrics_port}" if metrics_port else "",
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


def _subscribers(metrics_port: int) -> float:
    """Open StreamTelemetry subscriptions, from the control plane process's /metrics."""
    return scrape_metrics(metrics_port).get("sentinel_telemetry_subscribers{}", 0.0)


async def _wait_listening(process: subprocess.Popen[bytes]) -> None:
    assert process.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 30)
    assert b"listening" in line, line


async def test_agent_survives_sigkill_of_control_plane_without_loss_or_duplicates(
    pki: Pki, database_url: str, agent_factory: AgentFactory
) -> None:
    port, metrics_port = _free_port(), _free_port()
    process = _start_process(pki, port, database_url, metrics_port)
    try:
        await _wait_listening(process)
        node = await agent_factory("node-1", port)
        subscribers = functools.partial(asyncio.to_thread, _subscribers, metrics_port)
        async with stream_seqs(pki, port, "node-1", subscribers) as before:
            await eventually(lambda: len(before) >= 5)
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
        # The agent keeps collecting into its spool while nothing listens. It is then stopped,
        # so that it returns only once the new process has a subscriber.
        gap_start = node.agent.last_sample.seq
        await eventually(lambda: node.agent.last_sample.seq >= gap_start + 5)
        await node.stop()
        process = _start_process(pki, port, database_url, metrics_port)
        await _wait_listening(process)
        async with stream_seqs(pki, port, "node-1", subscribers) as after:
            node = await agent_factory("node-1", port)
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
