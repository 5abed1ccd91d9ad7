"""The control plane's open-files limit: raised to the hard limit at process start, and turned
into the number of agent sessions it leaves room for. Every agent session holds a descriptor
(its TCP connection) for as long as it lasts; a replica that admitted sessions until the limit
would have none left for its database, its operators, or even for accepting the connections it
means to refuse, and gRPC's accept loop would stall on "Too many open files"."""

from __future__ import annotations

import dataclasses
import logging
import os
import resource

UNLIMITED_CEILING = 1_048_576
"""Where the soft limit stops when the hard limit is unlimited and `nr_open` cannot be read
(Linux's default `nr_open`): setrlimit refuses anything above `nr_open`."""

MIN_RESERVE = 64
RESERVE_SHARE = 0.05


@dataclasses.dataclass(frozen=True, slots=True)
class OpenFilesLimit:
    """RLIMIT_NOFILE as the process found it, and as it is now."""

    found: int
    """The soft limit before it was raised."""
    soft: int
    hard: int
    problem: str = ""
    """Why the soft limit could not be raised; empty when it was, or needed no raising."""

    @classmethod
    def current(cls) -> OpenFilesLimit:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return cls(soft, soft, hard)


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return UNLIMITED_CEILING


def raise_open_files_limit() -> OpenFilesLimit:
    """Raises the soft RLIMIT_NOFILE to the hard limit (an unlimited hard limit: to `nr_open`):
    a service manager often starts a process with a soft limit of 1,024, far below what the
    hard limit allows, and raising it needs no privilege."""
    found = OpenFilesLimit.current()
    if found.hard == resource.RLIM_INFINITY:
        target = min(_nr_open(), UNLIMITED_CEILING)
    else:
        target = found.hard
    if found.soft == resource.RLIM_INFINITY or found.soft >= target:
        return found
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, found.hard))
    except (ValueError, OSError) as exc:
        return dataclasses.replace(found, problem=f"cannot raise it to {target}: {exc}")
    return dataclasses.replace(found, soft=target)


def count_open_descriptors() -> int | None:
    """Descriptors this process has open now (None where the system does not list them). Lists
    a directory: call it once at start, never per connection."""
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            # The listing includes the descriptor that reads the directory itself.
            return len(os.listdir(directory)) - 1
        except OSError:
            continue
    return None


def default_reserve(soft_limit: int) -> int:
    """Descriptors kept out of agent sessions' reach when `open_files_reserve` is 0: 5 % of the
    limit, at least 64 (1,000 of 20,000; 64 of 1,024)."""
    return max(MIN_RESERVE, int(soft_limit * RESERVE_SHARE))


@dataclasses.dataclass(frozen=True, slots=True)
class SessionRoom:
    """How many agent sessions the open-files limit leaves room for, and from what."""

    limit: OpenFilesLimit
    open_at_start: int
    reserve: int
    sessions: int | None
    """Agent sessions that fit; None when the limit is unlimited (no bound from it)."""


def session_room(limit: OpenFilesLimit, reserve: int = 0) -> SessionRoom:
    """The agent sessions that fit: the soft limit, less what is open now, less `reserve`
    (0: `default_reserve`) for everything else the process opens later (database connections,
    operators' calls, the connections of agents being refused, metrics scrapes)."""
    open_now = count_open_descriptors() or 0
    if limit.soft == resource.RLIM_INFINITY:
        return SessionRoom(limit, open_now, 0, None)
    kept = reserve if reserve > 0 else default_reserve(limit.soft)
    return SessionRoom(limit, open_now, kept, max(0, limit.soft - open_now - kept))


def effective_session_limit(max_agents: int, room: SessionRoom | None) -> tuple[int | None, str]:
    """The sessions a replica holds at most (None: no limit) and the refusal reason counted
    beyond it: `max_agents` when set ("capacity"), or the open-files room when that is lower
    ("fd_limit")."""
    fds = room.sessions if room is not None else None
    if fds is not None and (max_agents <= 0 or fds < max_agents):
        return fds, "fd_limit"
    return (max_agents if max_agents > 0 else None), "capacity"


def describe(room: SessionRoom, max_agents: int) -> tuple[int, str]:
    """The start-up log line (level, message) saying what the limit allows."""
    limit = room.limit
    level = logging.INFO
    if limit.problem:
        head = f"soft limit {limit.soft} (hard {limit.hard}) {limit.problem}"
        level = logging.WARNING
    elif limit.soft > limit.found:
        head = f"soft limit raised {limit.found} -> {limit.soft}"
    else:
        head = f"soft limit {limit.soft} (hard {limit.hard})"
    if room.sessions is None:
        return level, f"open files: {head}; no bound on agent sessions (max_agents {max_agents})"
    tail = (
        f"{room.open_at_start} open at start, {room.reserve} kept in reserve: room for about "
        f"{room.sessions:,} agent sessions (max_agents {max_agents})"
    )
    if room.sessions == 0:
        level = logging.ERROR
        tail += "; every agent session will be refused: raise `ulimit -n` / LimitNOFILE"
    elif 0 < room.sessions < max_agents:
        level = logging.WARNING
        tail += (
            f"; fewer than max_agents: sessions beyond {room.sessions:,} are refused, "
            "raise `ulimit -n` / LimitNOFILE or lower max_agents"
        )
    return level, f"open files: {head}; {tail}"
