"""Reading the event stream over the real API, as a client would."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import grpc
from sentinel.v1 import events_pb2, events_pb2_grpc

from tests.conftest import Pki

Kind = events_pb2.EventKind


@contextlib.asynccontextmanager
async def events_client(
    pki: Pki, port: int, role: str = "viewer", name: str = "watcher"
) -> AsyncIterator[events_pb2_grpc.EventServiceStub]:
    async with grpc.aio.secure_channel(
        f"localhost:{port}", pki.channel_credentials(role, name)
    ) as channel:
        yield events_pb2_grpc.EventServiceStub(channel)


class Watch:
    """A WatchEvents stream read in the background into `events`."""

    def __init__(
        self, stub: events_pb2_grpc.EventServiceStub, request: events_pb2.WatchEventsRequest
    ) -> None:
        self.call = stub.WatchEvents(request)
        self.events: list[events_pb2.Event] = []
        self.error: grpc.aio.AioRpcError | None = None
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self.events.append(response.event)
        except grpc.aio.AioRpcError as exc:
            self.error = exc

    async def until(
        self, check: Callable[[list[events_pb2.Event]], bool], timeout: float = 15.0
    ) -> list[events_pb2.Event]:
        async def wait() -> None:
            while not check(self.events):
                if self._task.done():
                    raise AssertionError(f"stream ended ({self.error}) with {self.events}")
                await asyncio.sleep(0.02)

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"not seen within {timeout} s; got {self.events}") from None
        return self.events

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def __aenter__(self) -> Watch:
        # The server sends the response headers once the watch is subscribed; from then on
        # nothing stored is missed (without waiting, an event stored before the request
        # reaches the server would be "the past").
        await asyncio.wait_for(self.call.initial_metadata(), 15)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()


def of_kind(events: list[events_pb2.Event], kind: int) -> list[events_pb2.Event]:
    return [e for e in events if e.kind == kind]
