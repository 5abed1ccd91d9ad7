"""Runs blocking calls on one dedicated worker thread with an asyncio deadline per call.

A driver call that hangs (NVML does, when a GPU wedges) keeps its thread forever; the runner
then refuses new calls at once instead of queueing them behind it, so callers never stall.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, TypeVarTuple

_log = logging.getLogger(__name__)

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")

_Job = tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]]


class CollectorTimeout(Exception):
    """A blocking call did not return within its deadline, or an earlier one still has not.

    `late_result`, set when the caller's own call overran, is that call's future: it completes
    if the call ever returns, so the caller can still pick up what the call produced.
    """

    def __init__(
        self, message: str, late_result: concurrent.futures.Future[Any] | None = None
    ) -> None:
        super().__init__(message)
        self.late_result = late_result


class DeadlineRunner:
    """One worker thread, one call at a time, each with a deadline.

    Concurrent callers wait their turn while the running call is within its deadline; once a
    call has overrun, every new call fails immediately with `CollectorTimeout` until it returns.
    The worker is a daemon thread so that a call stuck in a driver cannot block process exit.
    """

    def __init__(self, name: str = "NVML") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._turn = asyncio.Lock()
        self._in_flight: concurrent.futures.Future[Any] | None = None
        self._in_flight_since = 0.0
        self._closed = False

    @property
    def in_flight_seconds(self) -> float | None:
        """How long the current call has been running; None when the worker is idle."""
        in_flight = self._in_flight
        if in_flight is None or in_flight.done():
            return None
        return time.monotonic() - self._in_flight_since

    # The deadline is a parameter, not the caller's asyncio.timeout(), because the runner needs
    # it: an overrun is what marks the worker as stuck for the calls that follow.
    async def call(
        self,
        fn: Callable[[*_Ts], _T],
        *args: *_Ts,
        timeout: float,
    ) -> _T:
        """Runs `fn(*args)` on the worker; raises `CollectorTimeout` past `timeout` seconds.

        Exceptions raised by `fn` propagate unchanged.
        """
        if self._closed:
            raise RuntimeError(f"{self._name} runner is closed")
        name = getattr(fn, "__name__", repr(fn))
        deadline = asyncio.timeout(timeout)
        future: concurrent.futures.Future[_T] | None = None
        try:
            async with deadline, self._turn:
                stuck_for = self.in_flight_seconds
                if stuck_for is not None:
                    raise CollectorTimeout(
                        f"previous {self._name} call still running for {stuck_for:.0f}s"
                    )
                future = self._submit(fn, args)
                # Cancelling the wrapper on timeout does not touch `future`, which the worker
                # completes whenever the call finally returns.
                return await asyncio.wrap_future(future)
        except TimeoutError:
            if not deadline.expired():
                raise  # fn's own TimeoutError, not our deadline
            if future is None:
                raise CollectorTimeout(
                    f"{self._name} call {name} waited {timeout:g}s for the worker to be free"
                ) from None
            raise CollectorTimeout(
                f"{self._name} call {name} did not return within {timeout:g}s",
                late_result=future,
            ) from None

    def close(self) -> None:
        """Stops the worker after its current call; never waits for a stuck one."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)

    def _submit(
        self, fn: Callable[..., _T], args: tuple[Any, ...]
    ) -> concurrent.futures.Future[_T]:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name=f"{self._name.lower()}-worker", daemon=True
            )
            self._thread.start()
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        self._in_flight = future
        self._in_flight_since = time.monotonic()
        self._jobs.put((future, fn, args))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the caller, never lost with the thread
                future.set_exception(exc)
            else:
                future.set_result(result)
