"""Rebalancing agents over replicas: a full replica refuses with a retry-after that agents
honour, a stopping replica spreads its agents' return, an aged connection is cycled without
loss, and the local L4 proxy round-robins. Real control planes, real agents, real mTLS; each
behaviour is one replica's, so one control plane (SQLite or PostgreSQL) shows it."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import pathlib
from types import ModuleType
from typing import Any

import grpc
import pytest
from sentinel.v1 import agent_pb2_grpc

from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually
from tests.fakenvml import FakeNvml
from tests.processes.test_processes import _metrics as scrape_metrics

pytestmark = pytest.mark.timeout(30)

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _records(caplog: pytest.LogCaptureFixture, prefix: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name.startswith("nodeagent") and r.getMessage().startswith(prefix)
    ]


def _field(record: logging.LogRecord, name: str) -> Any:
    """A structured field the agent logged with the record (`extra=`)."""
    assert hasattr(record, name), f"{record.getMessage()!r} carries no {name}"
    return getattr(record, name)


def _no_loss(cp: Any, node_id: str) -> None:
    state = cp.registry.get(node_id)
    assert state is not None
    assert state.telemetry_gap_samples == 0, f"{node_id}: samples were lost"


async def test_agent_over_capacity_is_refused_with_retry_after_and_waits_it_out(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    no_nvidia_driver: FakeNvml,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cp = await control_plane_factory(max_agents=2, capacity_retry_after_s=1.0)
    first = await agent_factory("node-1", cp.port)
    await agent_factory("node-2", cp.port)

    # What any client sees at a full replica: UNAVAILABLE with the retry delay in a trailer,
    # drawn from [capacity_retry_after_s, twice that].
    async with grpc.aio.secure_channel(
        f"localhost:{cp.port}", pki.channel_credentials("agent", "node-4")
    ) as channel:
        # A client that sends no hello is refused after the server waited a second for one
        # (it lets a hello arrive first, so that an agent's write never races the refusal).
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "maximum of 2 agent sessions" in (refused.value.details() or "")
    retry_ms = int(dict(refused.value.trailing_metadata() or ())["retry-after-ms"])
    assert 1000 <= retry_ms <= 2000

    third = await agent_factory("node-3", cp.port, wait_connected=False)
    refusal = (await eventually(lambda: _records(caplog, "session refused")))[0]
    asked = _field(refusal, "retry_after_s")
    assert _field(refusal, "status") == "UNAVAILABLE"
    assert 1.0 <= asked <= 2.0
    # Room frees up at once; the agent still waits what it was asked to, not its 50 ms backoff.
    await first.stop()
    await asyncio.wait_for(third.agent.connected.wait(), 10)
    opened = [r for r in _records(caplog, "session open") if r.created > refusal.created]
    waited = opened[0].created - refusal.created
    assert waited >= asked, f"reconnected after {waited:.3f} s, asked to wait {asked:.3f} s"

    metrics = scrape_metrics(cp.metrics_port)
    # The raw client's refusal and the agent's one: the agent did not knock again meanwhile.
    assert metrics['sentinel_agent_sessions_refused_total{"reason": "capacity"}'] == 2
    assert cp.registry.session_for("node-3") is not None


async def test_stopping_replica_spreads_its_agents_return_and_they_lose_nothing(
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    no_nvidia_driver: FakeNvml,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = await control_plane_factory(
        reconnect_after_shutdown_s=0.5, reconnect_after_shutdown_spread_s=1.0
    )
    port = first.port
    nodes = [await agent_factory(f"node-{i}", port) for i in range(1, 5)]
    await eventually(lambda: all(n.agent.acked_seq >= 3 for n in nodes))

    await first.stop()
    told = await eventually(lambda: len(_records(caplog, "control plane going away")) == 4)
    assert told
    delays = [_field(r, "reconnect_after_s") for r in _records(caplog, "control plane going away")]
    assert all(0.5 <= d <= 1.5 for d in delays), delays
    assert len(set(delays)) == len(delays), f"the same delay told twice: {delays}"

    # A second replica on the same database takes over the address (as the survivor behind a
    # load balancer would); every agent comes back and its spool drains to it.
    second = await control_plane_factory(listen=f"127.0.0.1:{port}")
    await eventually(lambda: all(n.agent.sessions_opened == 2 for n in nodes))
    produced = {n.agent.settings.node_id: n.agent.last_sample.seq for n in nodes}
    await eventually(
        lambda: all(
            second.registry.get(node_id).last_telemetry_seq >= seq
            for node_id, seq in produced.items()
        )
    )
    for node_id in produced:
        _no_loss(second, node_id)
        assert second.registry.session_for(node_id) is not None


async def test_aged_connection_is_cycled_promptly_without_loss_or_error_backoff(
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    no_nvidia_driver: FakeNvml,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cp = await control_plane_factory(max_connection_age_s=1.5, max_connection_age_grace_s=0.5)
    node = await agent_factory("node-1", cp.port)
    # Two full cycles: GOAWAY at ~1.5 s (+/-10 %), the stream cut 0.5 s later, a new session.
    await eventually(lambda: node.agent.sessions_opened >= 3, timeout=15)

    ended = _records(caplog, "session ended: the control plane drained the connection")
    assert len(ended) >= 2
    opened = _records(caplog, "session open")
    for end in ended[:2]:
        back = next(r for r in opened if r.created >= end.created)
        assert back.created - end.created < 1.0, "the agent did not reconnect promptly"
    # The backoff after a drained session is the first, shortest one; nothing worse was logged.
    delays = [_field(r, "reconnect_delay_s") for r in _records(caplog, "reconnecting in")]
    assert delays and all(d <= node.agent.settings.backoff_base_s for d in delays), delays
    complaints = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("nodeagent") and r.levelno >= logging.WARNING
    ]
    assert complaints == []

    produced = node.agent.last_sample.seq
    await eventually(lambda: cp.registry.get("node-1").last_telemetry_seq >= produced)
    await eventually(lambda: node.agent.acked_seq >= produced)
    _no_loss(cp, "node-1")


def _load_l4proxy() -> ModuleType:
    spec = importlib.util.spec_from_file_location("l4proxy", ROOT / "scripts" / "l4proxy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_l4proxy_round_robins_connections_and_skips_a_dead_backend() -> None:
    l4proxy = _load_l4proxy()

    async def backend(name: bytes) -> asyncio.Server:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read()  # until the client half-closes
            writer.write(name + b":" + data)
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        return await asyncio.start_server(answer, "127.0.0.1", 0)

    def port_of(server: asyncio.Server) -> int:
        return int(server.sockets[0].getsockname()[1])

    a, b = await backend(b"a"), await backend(b"b")
    server, proxy = await l4proxy.start(
        ("127.0.0.1", 0), [("127.0.0.1", port_of(a)), ("127.0.0.1", port_of(b))]
    )
    payload = bytes(range(256)) * 1024  # bytes pass untouched, both ways

    async def exchange() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        name, _, echoed = answer.partition(b":")
        assert echoed == payload
        return name

    try:
        assert [await exchange() for _ in range(4)] == [b"a", b"b", b"a", b"b"]
        b.close()
        await b.wait_closed()
        assert [await exchange() for _ in range(3)] == [b"a", b"a", b"a"]
        assert proxy.connections == [5, 2]
    finally:
        server.close()
        await proxy.close_connections()
        await server.wait_closed()
        a.close()
        b.close()
        await a.wait_closed()
