"""Servicers for the services declared in the API whose implementation lands with later work:
each method answers UNIMPLEMENTED with a message that says so, instead of gRPC's bare default."""

from __future__ import annotations

from typing import Any

import grpc

# (servicer base, registration function, what is missing)
PENDING_SERVICES: list[tuple[type, Any, str]] = []


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
