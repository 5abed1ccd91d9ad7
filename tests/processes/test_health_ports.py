"""The health endpoints Kubernetes probes: the control plane's plaintext grpc.health.v1 port
(`health_listen`) and the agent's /healthz and /readyz beside its /metrics."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry
from sentinel.v1 import fleet_pb2, fleet_pb2_grpc

from nodeagent.exporter import AgentHealth, TelemetryExporter, start_http_endpoint
from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually
from tests.processes.test_processes import _free_port, _wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _check(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


async def test_health_port_answers_grpc_health_in_plaintext_like_the_main_port(
    control_plane_factory: ControlPlaneFactory, pki: Pki
) -> None:
    cp = await control_plane_factory(health_listen="127.0.0.1:0")
    assert cp.health_port not in (0, cp.port, cp.enrollment_port)
    main = grpc.aio.secure_channel(
        f"localhost:{cp.port}", pki.channel_credentials("viewer", "probe-compare")
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.health_port}") as plain, main:
        for service in ("", "sentinel.v1.FleetService", "sentinel.v1.AgentService"):
            assert await _check(plain, service) == SERVING
            assert await _check(plain, service) == await _check(main, service)
        try:
            await _check(plain, "sentinel.v1.NoSuchService")
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
        else:
            raise AssertionError("an unknown service was reported healthy")


async def test_health_port_serves_nothing_but_health(
    control_plane_factory: ControlPlaneFactory,
) -> None:
    cp = await control_plane_factory(health_listen="127.0.0.1:0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.health_port}") as plain:
        fleet = fleet_pb2_grpc.FleetServiceStub(plain)
        try:
            await fleet.ListAgents(fleet_pb2.ListAgentsRequest(), timeout=5)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNIMPLEMENTED
        else:
            raise AssertionError("the plaintext port answered an API call")
        reflection = reflection_pb2_grpc.ServerReflectionStub(plain)
        call = reflection.ServerReflectionInfo(timeout=5)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        try:
            await call.read()
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNIMPLEMENTED
        else:
            raise AssertionError("the plaintext port answered server reflection")


async def test_health_port_reports_not_serving_while_the_control_plane_stops(
    control_plane_factory: ControlPlaneFactory,
) -> None:
    cp = await control_plane_factory(health_listen="127.0.0.1:0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.health_port}") as plain:
        watch = health_pb2_grpc.HealthStub(plain).Watch(health_pb2.HealthCheckRequest())
        seen = [(await watch.read()).status]
        assert seen == [SERVING]
        stopping = asyncio.create_task(cp.stop())
        try:
            while True:
                message = await asyncio.wait_for(watch.read(), 10)
                if message is grpc.aio.EOF:
                    break
                seen.append(message.status)
        except grpc.aio.AioRpcError:
            pass  # the port closed under the stream, after saying what it had to say
        await stopping
    assert seen[-1] == NOT_SERVING


async def test_default_settings_open_no_health_port(
    control_plane_factory: ControlPlaneFactory,
) -> None:
    cp = await control_plane_factory()
    assert cp.health_port == 0


def test_controlplane_process_serves_health_on_the_flagged_port(
    pki: Pki, tmp_path: Path, database_url: str
) -> None:
    health_port = _free_port()
    log_path = tmp_path / "cp.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "sentinel-controlplane"),
                "--certs-dir",
                str(pki.directory),
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "",
                "--enrollment-listen",
                "",
                "--health-listen",
                f"127.0.0.1:{health_port}",
                "--database-url",
                database_url,
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)

                def serving() -> bool:
                    try:
                        response = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    except grpc.RpcError:
                        return False
                    return bool(response.status == SERVING)

                _wait_for(serving)
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(15)
    assert code == 0, log_path.read_text()


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode()


async def test_agent_healthz_follows_the_collect_loop_and_readyz_the_session(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    cp = await control_plane_factory()
    running = await agent_factory("health-node", cp.port)
    agent = running.agent
    registry = CollectorRegistry()
    exporter = TelemetryExporter(registry)
    agent.on_sample = exporter.update
    health = AgentHealth(
        exporter,
        interval_s=lambda: agent.settings.telemetry_interval_s,
        connected=agent.connected.is_set,
        min_stale_s=1.0,
    )
    server, thread = start_http_endpoint("127.0.0.1:0", registry, health)
    port = server.server_port
    try:

        async def answer(path: str) -> tuple[int, str]:
            return await asyncio.to_thread(_get, port, path)

        assert (await answer("/healthz"))[0] == 200
        await eventually(lambda: exporter.seconds_since_update()[1])
        status, body = await answer("/readyz")
        assert (status, body.split(":")[0]) == (200, "ok"), body
        metrics_status, metrics = await answer("/metrics")
        assert metrics_status == 200 and "sentinel_agent_telemetry_seq" in metrics

        # The control plane goes away: the agent is alive (restarting it would not help) but
        # not ready.
        await cp.stop()
        await eventually(lambda: not agent.connected.is_set())
        status, body = await answer("/readyz")
        assert status == 503 and "no session with the control plane" in body
        assert (await answer("/healthz"))[0] == 200

        # The collect loop stops: after the limit, the agent is not alive either.
        await running.stop()

        async def failing() -> bool:
            return (await answer("/healthz"))[0] == 503

        await eventually(failing, timeout=10)
        status, body = await answer("/healthz")
        assert "collect loop stalled" in body
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
