"""Servicers for the services declared in the API whose implementation lands with later work:
each method answers UNIMPLEMENTED with a message that says so, instead of gRPC's bare default."""

from __future__ import annotations

from typing import Any

import grpc
from sentinel.v1 import (
    auth_pb2_grpc,
    enrollment_pb2_grpc,
    identity_pb2_grpc,
)

# (servicer base, registration function, what is missing)
PENDING_SERVICES: list[tuple[type, Any, str]] = [
    (auth_pb2_grpc.AuthServiceServicer, auth_pb2_grpc.add_AuthServiceServicer_to_server, "login"),
    (
        enrollment_pb2_grpc.EnrollmentServiceServicer,
        enrollment_pb2_grpc.add_EnrollmentServiceServicer_to_server,
        "enrollment",
    ),
    (
        identity_pb2_grpc.IdentityServiceServicer,
        identity_pb2_grpc.add_IdentityServiceServicer_to_server,
        "revocation and users",
    ),
]


def _unimplemented(name: str, feature: str) -> Any:
    async def method(self: object, request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, f"{name}: {feature} is not available in this version"
        )

    return method


def pending_servicer(base: type, feature: str) -> object:
    methods = {
        name: _unimplemented(name, feature)
        for name in vars(base)
        if not name.startswith("_") and callable(getattr(base, name))
    }
    return type(f"Pending{base.__name__}", (base,), methods)()
