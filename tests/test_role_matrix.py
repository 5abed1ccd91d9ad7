"""Every RPC against every role: the outcome matches the role table in controlplane/auth/roles.py.

A refused call is PERMISSION_DENIED; an allowed one gets past the interceptor (whatever the
method then answers to an empty request: INVALID_ARGUMENT, NOT_FOUND, UNIMPLEMENTED, a stream...).
"""

from __future__ import annotations

import grpc
import pytest

from controlplane import ControlPlane
from controlplane.auth.roles import METHOD_ROLES, allowed

from .conftest import Pki

ROLES = ("agent", "planner", "operator", "viewer")
_STREAMING_REQUESTS = {
    "/sentinel.v1.AgentService/Connect",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
}
_STREAMING_RESPONSES = {
    "/sentinel.v1.FleetService/WatchAgents",
    "/sentinel.v1.TelemetryService/StreamTelemetry",
    "/sentinel.v1.PlanService/WatchPlan",
    "/grpc.health.v1.Health/Watch",
}


async def _call(channel: grpc.aio.Channel, method: str) -> grpc.StatusCode:
    """Calls `method` with one empty message; returns the status it ends with (or OK when a
    stream is still open after its first response)."""
    identity = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    try:
        if method in _STREAMING_REQUESTS:
            call = channel.stream_stream(method, **identity)(iter([b""]), timeout=1)
            async for _ in call:
                return grpc.StatusCode.OK
        elif method in _STREAMING_RESPONSES:
            call = channel.unary_stream(method, **identity)(b"", timeout=1)
            async for _ in call:
                return grpc.StatusCode.OK
        else:
            await channel.unary_unary(method, **identity)(b"", timeout=1)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("role", ROLES)
async def test_every_method_answers_each_role_as_the_table_says(
    pki: Pki, control_plane: ControlPlane, role: str
) -> None:
    mismatches = []
    async with grpc.aio.secure_channel(
        f"localhost:{control_plane.port}", pki.channel_credentials(role, f"matrix-{role}")
    ) as channel:
        for method, allowed_roles in sorted(METHOD_ROLES.items()):
            if method == "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo":
                continue  # grpcio-reflection serves v1alpha only
            code = await _call(channel, method)
            refused = code == grpc.StatusCode.PERMISSION_DENIED
            if refused == (role in allowed_roles):
                mismatches.append(f"{method}: {code.name}")
            assert code != grpc.StatusCode.UNKNOWN, f"{method} crashed for {role}"
    assert mismatches == [], f"{role}: outcome differs from the role table"


def test_a_method_missing_from_the_table_is_refused_for_everyone() -> None:
    for role in ROLES:
        assert not allowed("/sentinel.v1.FleetService/DeleteEverything", role)
