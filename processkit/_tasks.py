"""Supervision of long-lived asyncio tasks: nothing is fire-and-forget.

A supervised task that fails is logged with its traceback, counted, and restarted after a
capped backoff; stopping the supervisor cancels and awaits every task.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Supervisor:
    """Owns a set of named background tasks for one component."""

    def __init__(self, name: str, on_failure: Callable[[str], None] | None = None) -> None:
        self._name = name
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._on_failure = on_failure
        self.failures: dict[str, int] = {}

    def start(
        self,
        name: str,
        factory: Callable[[], Coroutine[Any, Any, None]],
        *,
        restart: bool = True,
        max_backoff: float = 30.0,
    ) -> None:
        """Runs `factory()` as task `name`; restarts it when it raises (not when it returns)."""
        if name in self._tasks and not self._tasks[name].done():
            raise RuntimeError(f"task {name!r} is already running in {self._name}")
        self._tasks[name] = asyncio.create_task(
            self._run(name, factory, restart, max_backoff), name=f"{self._name}:{name}"
        )

    async def _run(
        self,
        name: str,
        factory: Callable[[], Coroutine[Any, Any, None]],
        restart: bool,
        max_backoff: float,
    ) -> None:
        attempt = 0
        while True:
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                attempt += 1
                self.failures[name] = self.failures.get(name, 0) + 1
                if self._on_failure is not None:
                    self._on_failure(name)
                log.exception("task %s/%s failed (failure %d)", self._name, name, attempt)
                if not restart:
                    return
                await asyncio.sleep(random.uniform(0, min(max_backoff, 0.1 * 2**attempt)))  # noqa: S311

    async def stop(self) -> None:
        """Cancels every task and waits for them to finish.

        A task is cancelled again until it ends: on Python 3.11, `asyncio.wait_for` swallows a
        cancellation that arrives as the awaited thing completes (CPython gh-86296), and a
        loop around it would then wait forever for the stop that was already asked."""
        tasks = list(self._tasks.values())
        pending = [t for t in tasks if not t.done()]
        while pending:
            for task in pending:
                task.cancel()
            _, still = await asyncio.wait(pending, timeout=0.5)
            pending = list(still)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Waits until `event` is set or `timeout` passes; True when it was set. Unlike
    `asyncio.wait_for(event.wait(), timeout)` on Python 3.11, a cancellation that arrives as
    the event is set is never swallowed (CPython gh-86296)."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return bool(done)
