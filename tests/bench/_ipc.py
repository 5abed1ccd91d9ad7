"""Small helpers shared by the benchmark's processes: asyncio over a multiprocessing pipe,
readings from /proc, and percentiles."""

from __future__ import annotations

import asyncio
import math
import resource
from multiprocessing.connection import Connection
from typing import Any

Message = dict[str, Any]


async def receive(conn: Connection, timeout: float | None = None) -> Message:
    """Waits for the next message on `conn` without blocking the event loop.

    The loop watches the pipe's file descriptor instead of parking a thread in `recv`, so a
    measured server process pays nothing while it waits for its simulator.
    """
    loop = asyncio.get_running_loop()
    if not conn.poll():
        ready: asyncio.Future[None] = loop.create_future()
        fd = conn.fileno()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await asyncio.wait_for(ready, timeout)
        finally:
            loop.remove_reader(fd)
    message: Message = conn.recv()
    return message


def raise_fd_limit() -> int:
    """Raises the soft RLIMIT_NOFILE to the hard limit (each agent costs a descriptor on both
    sides of the connection); child processes inherit it. Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_bytes() -> int:
    """This process's resident set size (VmRSS)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def thread_count() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile: an observed value, so p99 of 200 samples is the 2nd largest."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]
