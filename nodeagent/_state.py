"""The agent's durable state in one SQLite file: the telemetry spool (bounded), the telemetry
sequence counter, the boot counter, the cordon mark, and the commands it executed (so each runs
at most once, across its own restarts, and its result can be re-sent).

All methods block; the agent calls them from a worker thread, except `note_acknowledged` and
`take_dropped`, which do no I/O and are meant for the event loop.

Durability: the database runs in WAL mode with synchronous=NORMAL, so a commit costs no fsync
(only checkpoints sync): a committed transaction survives a crash of the agent (it is in the
WAL, in the OS page cache) and only a crash of the OS or a power loss can roll back the last
ones. For telemetry that is the right price: the node that lost power lost those samples'
subject with them, and the control plane counts what it never got as a gap. Command records
are written with synchronous=FULL instead (the WAL is synced before the commit returns), so a
command that was started is never forgotten, even across a power loss, and is never run twice.

The spool write of one sample is one transaction: the acknowledgements that came since the last
one (noted in memory by the session, without touching the disk), the sample, and the trimming to
the bound. The sequence counter is the newest spooled seq; it is written to `meta` only before a
delete that may take the newest sample (an acknowledgement of everything, a full disk), so a
restart never reuses a seq that was sent. The number of spooled samples is kept in memory, so no
write scans the spool.

A full disk (docs/failures.md) costs telemetry, never a command record: the store keeps a small
reserve file beside its database and gives it up when a write fails for want of space, so that
deleting samples and recording commands can still go on; command records are written before
spool samples are kept, samples that find no room are dropped and counted (their seq is burned,
so the control plane sees the gap), and the reserve is taken back once there is room again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pathlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
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
            # This store is the database's only writer: what it counts stays true.
            count, newest = self._db.execute("SELECT COUNT(*), MAX(seq) FROM spool").fetchone()
            self._count = int(count)
            # The counter in `meta` is written only when the spool may lose its newest sample;
            # otherwise the newest spooled seq is the counter (see `_store_sample`).
            self._stored_next = self._get("next_seq")
            self._next = max(self._stored_next, int(newest or 0) + 1)
        self.dropped_total = 0
        """Samples dropped since start: spool bound or full disk (also counted as gaps)."""
        self._dropped_reported = 0
        # The seq after the last sample dropped for want of room: never reused in this run.
        self._seq_floor = 0
        # Acknowledged seqs: the highest one noted (raised under `_ack_lock` only) and the
        # highest one deleted (written under `_lock` only); a delete that found no room is
        # retried with the next write.
        self._ack_lock = threading.Lock()
        self._ack_noted = 0
        self._ack_applied = 0
        # Results of finished commands whose record found no room; kept (and answered from)
        # in memory, written with the next write that finds room.
        self._unrecorded: dict[str, bytes] = {}

    def close(self) -> None:
        with self._lock:
            try:
                self._apply_acks()
            except sqlite3.Error as exc:
                # Harmless: the next session's welcome acknowledges them again.
                log.warning("could not delete acknowledged samples at close: %s", exc)
            finally:
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
            self._store_next_seq()  # what follows may delete the newest sample
            self._apply_acks()
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
            self._count = int(count)
            self._full_bound = max(self._count, 1)
        except sqlite3.Error as exc:
            if not _full(exc):
                raise
            log.warning("no room even after giving up the reserve: %s", exc)

    def _count_dropped(self, samples: int) -> None:
        self.dropped_total += samples

    def take_dropped(self) -> int:
        """Samples dropped since the last call (for the next batch's `dropped_samples`). No
        I/O; call it from one thread only (the session's)."""
        total = self.dropped_total
        dropped = total - self._dropped_reported
        self._dropped_reported = total
        return dropped

    def _after_write(self) -> None:
        """A write found room: catch up on what earlier writes could not store."""
        try:
            self._apply_acks()
            if self._unrecorded:
                with self._synced():
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

    def _store_next_seq(self) -> None:
        """Writes the sequence counter to `meta` (autocommit) unless it is there already: due
        before anything that may delete the newest spooled sample."""
        if self._stored_next != self._next:
            self._set("next_seq", self._next)
            self._stored_next = self._next

    def next_boot(self) -> int:
        with self._lock:
            boot = self._get("boot_count") + 1
            self._set("boot_count", boot)
            return boot

    def next_seq(self) -> int:
        """The seq the next sample will carry (1 for a brand-new agent)."""
        with self._lock:
            return max(self._next, self._seq_floor)

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
        sent). The same transaction deletes what was acknowledged since the last write. A
        sample that finds no room even after the oldest samples are dropped is itself dropped
        and counted; its seq is not reused, so the control plane counts the gap.
        """
        return self.spool_sample(payload_for_seq)[0]

    def spool_sample(self, payload_for_seq: Callable[[int], bytes]) -> tuple[int, bool]:
        """`spool`, also telling whether the sample was stored (False: dropped for room)."""
        with self._lock:
            seq = max(self._next, self._seq_floor)
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
                    return seq, False
            self._after_write()
            return seq, True

    def _store_sample(self, seq: int, payload: bytes) -> None:
        db = self._db
        acked = self._ack_noted
        count = self._count
        if acked <= self._ack_applied and count < (
            self._full_bound if self.disk_full else self._max_spool
        ):
            # Nothing to delete: the insert is the whole transaction (autocommit).
            db.execute("INSERT INTO spool(seq, payload) VALUES(?, ?)", (seq, payload))
            self._count = count + 1
            self._next = seq + 1
            return
        excess = 0
        stores_next = False
        db.execute("BEGIN IMMEDIATE")
        try:
            if acked > self._ack_applied:
                count -= db.execute("DELETE FROM spool WHERE seq <= ?", (acked,)).rowcount
            db.execute("INSERT INTO spool(seq, payload) VALUES(?, ?)", (seq, payload))
            count += 1
            # On a full disk the spool may not grow past what it held then: each new sample
            # takes the place of the oldest, so the room left is kept for command records.
            excess = count - (self._full_bound if self.disk_full else self._max_spool)
            # The newest spooled seq is the counter while the sample stays (the acknowledged
            # ones deleted above are older); only a bound that leaves nothing needs `meta`.
            stores_next = excess >= count
            if stores_next:
                self._set("next_seq", seq + 1)
            if excess > 0:
                # Oldest first: recent telemetry is worth more than old. The control plane
                # sees the jump in seq and counts the gap.
                count -= db.execute(
                    "DELETE FROM spool WHERE seq IN (SELECT seq FROM spool ORDER BY seq LIMIT ?)",
                    (excess,),
                ).rowcount
            db.execute("COMMIT")
        except BaseException:
            # SQLite rolls back by itself on some errors (SQLITE_FULL among them); a second
            # ROLLBACK would replace the real error with "no transaction is active".
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        # Committed: only now does the bookkeeping follow.
        if excess > 0:
            self._count_dropped(excess)
        self._count = count
        self._next = seq + 1
        if stores_next:
            self._stored_next = seq + 1
        self._ack_applied = max(self._ack_applied, acked)

    def unsent(self, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, payload FROM spool WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [(int(seq), bytes(payload)) for seq, payload in rows]

    def note_acknowledged(self, seq: int) -> None:
        """Notes that the control plane holds every sample up to `seq`; the samples are deleted
        with the next write (no I/O here: the event loop may call it). Until then they are
        neither re-sent nor counted: the session resumes after the control plane's own
        acknowledged seq, and `spool_bounds` leaves them out."""
        with self._ack_lock:  # never held across I/O: the event loop does not wait on it
            if seq > self._ack_noted:
                self._ack_noted = seq

    def acknowledge(self, seq: int) -> None:
        """Drops every sample up to and including `seq` (the control plane holds them) now; on
        a full disk the delete waits for the next write that finds room (never raises for it:
        the session goes on)."""
        self.note_acknowledged(seq)
        with self._lock:
            try:
                self._apply_acks()
            except sqlite3.Error as exc:
                if not _full(exc):
                    raise

    def _apply_acks(self) -> None:
        """Deletes what was acknowledged and not yet deleted (under the lock, autocommit)."""
        acked = self._ack_noted
        if acked > self._ack_applied:
            if acked >= self._next - 1:
                self._store_next_seq()  # the newest sample goes too
            self._count -= self._db.execute("DELETE FROM spool WHERE seq <= ?", (acked,)).rowcount
            self._ack_applied = acked

    def spool_bounds(self) -> tuple[int, int]:
        """(oldest unacknowledged seq in the spool or 0, number of such samples)."""
        with self._lock:
            oldest, count = self._db.execute(
                "SELECT MIN(seq), COUNT(*) FROM spool WHERE seq > ?", (self._ack_noted,)
            ).fetchone()
        return int(oldest or 0), int(count)

    # -- executed commands ------------------------------------------------------------------

    @contextlib.contextmanager
    def _synced(self) -> Iterator[None]:
        """Commits inside are synced to disk before they return (see the module docstring)."""
        self._db.execute("PRAGMA synchronous=FULL")
        try:
            yield
        finally:
            self._db.execute("PRAGMA synchronous=NORMAL")

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
        with self._lock, self._synced():
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
        with self._lock, self._synced():
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
