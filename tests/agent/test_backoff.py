"""Reconnect backoff: full jitter from the first retry, capped; and, after attempts that got no
welcome in time (a control plane too busy to answer), a longer wait for the welcome and a longer
delay between attempts, so a storm does not feed itself."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pathlib
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from sentinel.v1 import agent_pb2, agent_pb2_grpc

from nodeagent.agent import (
    NodeAgent,
    WelcomeWait,
    backoff_delay,
    timeout_backoff_delay,
)
from nodeagent.collectors import HostCollector
from nodeagent.settings import AgentSettings
from tests.conftest import Pki, eventually


def test_first_retry_is_jittered_and_delays_are_capped() -> None:
    rng = random.Random(7)
    first = [backoff_delay(0, 0.5, 30.0, rng) for _ in range(1000)]
    assert 0.0 <= min(first) < 0.05 and 0.45 < max(first) <= 0.5
    late = [backoff_delay(20, 0.5, 30.0, rng) for _ in range(1000)]
    assert max(late) <= 30.0 and min(late) < 3.0
    # The bound doubles per attempt until the cap.
    assert max(backoff_delay(3, 0.5, 30.0, rng) for _ in range(1000)) <= 4.0


def test_welcome_wait_doubles_after_each_timeout_up_to_its_cap_and_resets_after_a_welcome() -> None:
    wait = WelcomeWait(10.0, 60.0)
    seen = [wait.seconds]
    changed = []
    for _ in range(5):
        changed.append(wait.timed_out())
        seen.append(wait.seconds)

    assert seen == [10.0, 20.0, 40.0, 60.0, 60.0, 60.0]
    # Only the changes are news (the agent logs those, not every attempt).
    assert changed == [True, True, True, False, False]
    assert wait.timeouts == 5
    assert wait.welcomed() is True
    assert (wait.seconds, wait.timeouts) == (10.0, 0)
    assert wait.welcomed() is False


def test_a_cap_below_the_setting_keeps_the_setting() -> None:
    wait = WelcomeWait(10.0, 5.0)
    assert wait.timed_out() is False
    assert wait.seconds == 10.0


def test_delay_after_a_timeout_is_never_immediate_and_longer_than_after_a_failure() -> None:
    rng = random.Random(11)
    # The first retry after a plain failure may come at once; after a welcome that did not come
    # within 10 s, it comes 5-10 s later (the upper half of a bound as long as that wait).
    plain = [backoff_delay(0, 0.5, 30.0, rng) for _ in range(1000)]
    after_timeout = [timeout_backoff_delay(0, 0.5, 30.0, 10.0, rng) for _ in range(1000)]
    assert max(plain) <= 0.5
    assert 5.0 <= min(after_timeout) < 5.1 and 9.9 < max(after_timeout) <= 10.0
    # The backoff cap still bounds it, and a grown attempt bound wins over a short wait.
    capped = [timeout_backoff_delay(3, 0.5, 30.0, 60.0, rng) for _ in range(1000)]
    assert min(capped) >= 15.0 and max(capped) <= 30.0
    grown = [timeout_backoff_delay(6, 0.5, 30.0, 1.0, rng) for _ in range(1000)]
    assert min(grown) >= 15.0 and max(grown) <= 30.0


# -- the real session against a control plane that does not answer -----------------------------


@dataclasses.dataclass
class _Attempt:
    hello_at: float
    ended_at: float | None = None


class _SilentControlPlane(agent_pb2_grpc.AgentServiceServicer):
    """Takes every hello and answers none, until `welcome` is set: a control plane too busy
    to answer. Records when each attempt's hello came and when the agent gave it up."""

    def __init__(self) -> None:
        self.attempts: list[_Attempt] = []
        self.welcome = False

    async def Connect(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        first = await anext(aiter(request_iterator))
        assert first.WhichOneof("message") == "hello"
        attempt = _Attempt(time.monotonic())
        self.attempts.append(attempt)
        try:
            if self.welcome:
                welcome = agent_pb2.Welcome(session_id="s-1", max_batch_samples=100)
                welcome.telemetry_interval.FromMilliseconds(200)
                yield agent_pb2.ConnectResponse(welcome=welcome)
            async for _message in request_iterator:
                pass
        finally:
            attempt.ended_at = time.monotonic()

    async def RenewCertificate(
        self, request: agent_pb2.RenewCertificateRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.RenewCertificateResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not part of this test")
        raise AssertionError("unreachable: abort raises")


@pytest.fixture
async def silent_control_plane(pki: Pki) -> AsyncIterator[tuple[_SilentControlPlane, int]]:
    servicer = _SilentControlPlane()
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    files = pki.server_files()
    credentials = grpc.ssl_server_credentials(
        [(files.key.read_bytes(), files.cert.read_bytes())],
        root_certificates=files.ca.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield servicer, port
    finally:
        await server.stop(0)


async def test_agent_waits_longer_for_a_welcome_after_each_timeout_and_resets_after_one(
    pki: Pki,
    tmp_path: pathlib.Path,
    silent_control_plane: tuple[_SilentControlPlane, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    servicer, port = silent_control_plane
    cert, key = pki.client("agent", "busy-node")
    settings = AgentSettings(
        node_id="busy-node",
        ca=pki.ca_path,
        cert=cert,
        key=key,
        control_plane=f"localhost:{port}",
        state_dir=tmp_path / "agent",
        metrics_listen="",
        telemetry_interval_s=0.2,
        backoff_base_s=0.01,
        backoff_cap_s=0.3,
        connect_timeout_s=0.2,
        connect_timeout_max_s=0.8,
    )
    agent = NodeAgent(settings, host_collector=HostCollector())
    caplog.set_level(logging.INFO, logger="nodeagent")
    task = asyncio.create_task(agent.run())
    try:
        await eventually(
            lambda: len([a for a in servicer.attempts if a.ended_at is not None]) >= 4,
            timeout=15,
        )
        servicer.welcome = True
        await asyncio.wait_for(agent.connected.wait(), 10)
    finally:
        agent.stop()
        await asyncio.wait_for(task, 10)

    timed_out = [a for a in servicer.attempts if a.ended_at is not None][:4]
    waits = [a.ended_at - a.hello_at for a in timed_out if a.ended_at is not None]
    # 0.2 s, then doubled per timeout up to the cap: 0.4, 0.8, 0.8 (plus the time to notice).
    for waited, expected in zip(waits, (0.2, 0.4, 0.8, 0.8), strict=True):
        assert expected - 0.05 <= waited < expected + 1.0, waits
    # Never an immediate retry after a timeout: at least half the wait that timed out (capped
    # by the backoff cap), where a plain failure would retry within 10 ms.
    delays = [r.reconnect_delay_s for r in caplog.records if hasattr(r, "reconnect_delay_s")]
    for delay, (low, high) in zip(
        delays[:4], ((0.1, 0.2), (0.15, 0.3), (0.15, 0.3), (0.15, 0.3)), strict=True
    ):
        assert low <= delay <= high, delays
    assert agent.sessions_opened == 1
    # One warning per change of the wait (0.2 -> 0.4 -> 0.8), not one per attempt; one line
    # when a welcome brings it back.
    warnings = [
        r.getMessage().split(";")[0]
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith("no welcome within")
    ]
    assert warnings == [
        "no welcome within 0.2 s (1 attempt(s) in a row): the control plane may be overloaded",
        "no welcome within 0.4 s (2 attempt(s) in a row): the control plane may be overloaded",
    ]
    assert any(
        r.getMessage() == "welcomed: the wait for a welcome is back to 0.2 s"
        for r in caplog.records
    )
