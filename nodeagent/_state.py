"""The agent's durable state in one SQLite file: the telemetry spool (bounded), the telemetry
sequence counter, the boot counter, the cordon mark, and the commands it executed (so each runs
at most once, across its own restarts, and its result can be re-sent).

All methods block; the agent calls them from a worker thread.

A full disk (docs/failures.md) costs telemetry, never a command record: the store keeps a small
reserve file beside its database and gives it up when a write fails for want of space, so that
deleting samples and recording commands can still go on; command records are written before
spool samples are kept, samples that find no room are dropped and counted (their seq is burned,
so the control plane sees the gap), and the reserve is taken back once there is room again.
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

_RESERVE_NAME = "agent.reserve"
# Room kept back for the writes that must happen when the disk is full: finishing a WAL
# checkpoint (at most _WAL_PAGES pages), deleting samples, recording commands.
_RESERVE_BYTES = 512 * 1024
_WAL_PAGES = 64
# A sample that finds no room frees this share of the spool (oldest first) before it is dropped.
_FREE_SHARE = 10

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS executed (
    command_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,          -- STARTED or FINISHED
    result BLOB,                  -- serialized CommandResult when FINISHED
    at REAL NOT NULL
);
"""


class StateFull(OSError):
    """The state directory has no room for a record the agent must write before acting."""


def _full(exc: BaseException) -> bool:
    """Whether a write failed for want of space (SQLite's SQLITE_FULL or ENOSPC)."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def state_dir_problem(state_dir: pathlib.Path) -> str | None:
    """Why the agent cannot keep its state in `state_dir` (None when it can): the directory
    must exist or be creatable, and take a file write and a database write."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        probe = state_dir / f".write-check-{os.getpid()}"
        try:
            with probe.open("wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
        store = AgentStateStore(state_dir / "agent.db", max_spool_samples=1)
        try:
            store.check_writable()
        finally:
            store.close()
    except (OSError, sqlite3.Error) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass(frozen=True, slots=True)
class ExecutedCommand:
    """A command the agent has started or finished, remembered across its restarts."""

    command_id: str
    finished: bool
    result: bytes | None


class AgentStateStore:
    """The agent's durable state in SQLite: telemetry spool, executed commands, cordon mark."""

    def __init__(self, path: pathlib.Path, *, max_spool_samples: int, keep_executed: int = 10_000):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._max_spool = max_spool_samples
        self._keep_executed = keep_executed
        self._reserve = path.parent / _RESERVE_NAME
        self.disk_full = False
        """Whether the last write that needed room found none (until the reserve is back)."""
        self._full_bound = max_spool_samples
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # A short WAL bounds what a checkpoint must still write when the disk is full.
            self._db.execute(f"PRAGMA wal_autocheckpoint={_WAL_PAGES}")
            self._db.executescript(_SCHEMA)
            self._take_reserve()
        self.dropped_since_report = 0
        self.dropped_total = 0
        """Samples dropped since start: spool bound or full disk (also counted as gaps)."""
        # The seq after the last sample dropped for want of room: never reused in this run.
        self._seq_floor = 0
        # An acknowledgement whose delete found no room; retried with the next write.
        self._pending_ack = 0
        # Results of finished commands whose record found no room; kept (and answered from)
        # in memory, written with the next write that finds room.
        self._unrecorded: dict[str, bytes] = {}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def check_writable(self) -> None:
        """Writes and commits one row: raises what a write in the state directory raises."""
        with self._lock:
            self._set("write_check", int(time.time()))

    # -- room on a full disk ------------------------------------------------------------------

    def _take_reserve(self) -> None:
        """Puts the reserve file back when there is room for it and some to spare."""
        if self._reserve.exists():
            return
        try:
            stat = os.statvfs(self._reserve.parent)
            if stat.f_bavail * stat.f_frsize < 2 * _RESERVE_BYTES:
                return
            with self._reserve.open("wb") as f:
                f.write(b"\0" * _RESERVE_BYTES)
        except OSError as exc:
            self._reserve.unlink(missing_ok=True)
            log.warning("cannot keep a reserve in the state directory: %s", exc)
            return
        if self.disk_full:
            log.info("the state directory has room again")
        self.disk_full = False

    def _make_room(self, *, drop_samples: bool) -> None:
        """After a write found no room: gives up the reserve, finishes the WAL, applies a
        pending acknowledgement and, when `drop_samples`, drops the oldest spooled samples."""
        if not self.disk_full:
            log.error(
                "the state directory %s is full: telemetry samples are dropped (and counted) "
                "until there is room; commands are refused when they cannot be recorded",
                self._reserve.parent,
            )
        self.disk_full = True
        self._reserve.unlink(missing_ok=True)
        self._full_bound = self._max_spool
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            if self._pending_ack:
                self._db.execute("DELETE FROM spool WHERE seq <= ?", (self._pending_ack,))
                self._pending_ack = 0
            if drop_samples:
                (count,) = self._db.execute("SELECT COUNT(*) FROM spool").fetchone()
                excess = -(-int(count) // _FREE_SHARE)  # at least one while any is spooled
                if excess:
                    self._db.execute(
                        "DELETE FROM spool WHERE seq IN "
                        "(SELECT seq FROM spool ORDER BY seq LIMIT ?)",
                        (excess,),
                    )
                    self._count_dropped(excess)
            (count,) = self._db.execute("SELECT COUNT(*) FROM spool").fetchone()
            self._full_bound = max(int(count), 1)
        except sqlite3.Error as exc:
            if not _full(exc):
                raise
            log.warning("no room even after giving up the reserve: %s", exc)

    def _count_dropped(self, samples: int) -> None:
        self.dropped_since_report += samples
        self.dropped_total += samples

    def _after_write(self) -> None:
        """A write found room: catch up on what earlier writes could not store."""
        try:
            if self._pending_ack:
                self._db.execute("DELETE FROM spool WHERE seq <= ?", (self._pending_ack,))
                self._pending_ack = 0
            for command_id, result in list(self._unrecorded.items()):
                self._write_finished(command_id, result)
                del self._unrecorded[command_id]
        except sqlite3.Error as exc:
            if not _full(exc):
                raise
            return  # still no room for these: the next write tries again
        self._take_reserve()

    # -- counters -------------------------------------------------------------------------

    def _get(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set(self, key: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def next_boot(self) -> int:
        with self._lock:
            boot = self._get("boot_count") + 1
            self._set("boot_count", boot)
            return boot

    def next_seq(self) -> int:
        """The seq the next sample will carry (1 for a brand-new agent)."""
        with self._lock:
            return max(self._get("next_seq") or 1, self._seq_floor)

    def get_setting(self, key: str) -> int:
        with self._lock:
            return self._get(f"setting:{key}")

    def put_setting(self, key: str, value: int) -> None:
        with self._lock:
            self._set(f"setting:{key}", value)

    def is_cordoned(self) -> bool:
        """Whether the node is cordoned in Sentinel's scheduling view (False when never set)."""
        with self._lock:
            return bool(self._get("cordoned"))

    def set_cordoned(self, cordoned: bool) -> bool:
        """Stores the cordon mark; returns the previous one (read and write under one lock)."""
        with self._lock:
            previous = bool(self._get("cordoned"))
            self._set("cordoned", int(cordoned))
            return previous

    # -- spool ------------------------------------------------------------------------------

    def spool(self, payload_for_seq: Callable[[int], bytes]) -> int:
        """Assigns the next seq, stores the sample, trims the spool to its bound; returns seq.

        `payload_for_seq(seq) -> bytes` builds the serialized sample once the seq is known, so
        seq assignment and storage are one transaction (a crash never reuses a seq that was
        sent). A sample that finds no room even after the oldest samples are dropped is itself
        dropped and counted; its seq is not reused, so the control plane counts the gap.
        """
        with self._lock:
            seq = max(self._get("next_seq") or 1, self._seq_floor)
            payload = payload_for_seq(seq)
            try:
                self._store_sample(seq, payload)
            except sqlite3.Error as exc:
                if not _full(exc):
                    raise
                self._make_room(drop_samples=True)
                try:
                    self._store_sample(seq, payload)
                except sqlite3.Error as again:
                    if not _full(again):
                        raise
                    self._seq_floor = seq + 1
                    self._count_dropped(1)
                    return seq
            self._after_write()
            return seq

    def _store_sample(self, seq: int, payload: bytes) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("INSERT INTO spool(seq, payload) VALUES(?, ?)", (seq, payload))
            self._set("next_seq", seq + 1)
            (count,) = self._db.execute("SELECT COUNT(*) FROM spool").fetchone()
            # On a full disk the spool may not grow past what it held then: each new sample
            # takes the place of the oldest, so the room left is kept for command records.
            excess = count - (self._full_bound if self.disk_full else self._max_spool)
            if excess > 0:
                # Oldest first: recent telemetry is worth more than old. The control plane
                # sees the jump in seq and counts the gap.
                self._db.execute(
                    "DELETE FROM spool WHERE seq IN (SELECT seq FROM spool ORDER BY seq LIMIT ?)",
                    (excess,),
                )
                self._count_dropped(excess)
            self._db.execute("COMMIT")
        except BaseException:
            # SQLite rolls back by itself on some errors (SQLITE_FULL among them); a second
            # ROLLBACK would replace the real error with "no transaction is active".
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def unsent(self, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, payload FROM spool WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [(int(seq), bytes(payload)) for seq, payload in rows]

    def acknowledge(self, seq: int) -> None:
        """Drops every sample up to and including `seq` (the control plane holds them); on a
        full disk the delete waits for the next write that finds room (never raises for it:
        the session goes on)."""
        with self._lock:
            try:
                self._db.execute("DELETE FROM spool WHERE seq <= ?", (seq,))
            except sqlite3.Error as exc:
                if not _full(exc):
                    raise
                self._pending_ack = max(self._pending_ack, seq)

    def spool_bounds(self) -> tuple[int, int]:
        """(oldest seq in the spool or 0, number of samples in it)."""
        with self._lock:
            oldest, count = self._db.execute("SELECT MIN(seq), COUNT(*) FROM spool").fetchone()
        return int(oldest or 0), int(count)

    # -- executed commands ------------------------------------------------------------------

    def executed(self, command_id: str) -> ExecutedCommand | None:
        with self._lock:
            unrecorded = self._unrecorded.get(command_id)
            if unrecorded is not None:
                return ExecutedCommand(command_id, True, unrecorded)
            row = self._db.execute(
                "SELECT state, result FROM executed WHERE command_id = ?", (command_id,)
            ).fetchone()
        if row is None:
            return None
        return ExecutedCommand(command_id, row[0] == "FINISHED", row[1])

    def mark_started(self, command_id: str) -> None:
        """Records that the command is about to run. Raises StateFull when there is no room
        even after dropping spooled samples: a command is never run without its record."""
        statement = (
            "INSERT OR IGNORE INTO executed(command_id, state, result, at) "
            "VALUES(?, 'STARTED', NULL, ?)"
        )
        with self._lock:
            try:
                self._db.execute(statement, (command_id, time.time()))
            except sqlite3.Error as exc:
                if not _full(exc):
                    raise
                self._make_room(drop_samples=True)
                try:
                    self._db.execute(statement, (command_id, time.time()))
                except sqlite3.Error as again:
                    if not _full(again):
                        raise
                    raise StateFull(
                        errno.ENOSPC,
                        f"no room in the state directory {self._reserve.parent} to record the "
                        "command before running it",
                    ) from again
            self._after_write()

    def mark_finished(self, command_id: str, result: bytes) -> None:
        """Records the command's result. Without room even after dropping spooled samples the
        result is kept in memory (and answered from) until a write finds room; the record
        on disk stays STARTED, so after a restart the command is reported, never re-run."""
        with self._lock:
            try:
                self._write_finished(command_id, result)
            except sqlite3.Error as exc:
                if not _full(exc):
                    raise
                self._make_room(drop_samples=True)
                try:
                    self._write_finished(command_id, result)
                except sqlite3.Error as again:
                    if not _full(again):
                        raise
                    log.error(
                        "no room to record the result of command %s; it is kept in memory "
                        "until there is",
                        command_id,
                    )
                    self._unrecorded[command_id] = result
                    return
            self._after_write()

    def _write_finished(self, command_id: str, result: bytes) -> None:
        self._db.execute(
            "UPDATE executed SET state = 'FINISHED', result = ?, at = ? WHERE command_id = ?",
            (result, time.time(), command_id),
        )
        self._db.execute(
            "DELETE FROM executed WHERE rowid <= (SELECT MAX(rowid) FROM executed) - ?",
            (self._keep_executed,),
        )

    def last_executed_command_id(self) -> str:
        with self._lock:
            row = self._db.execute(
                "SELECT command_id FROM executed ORDER BY rowid DESC LIMIT 1"
            ).fetchone()
        return str(row[0]) if row else ""
