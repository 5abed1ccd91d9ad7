"""The agent's durable state in one SQLite file: the telemetry spool (bounded), the telemetry
sequence counter, the boot counter, the cordon mark, and the commands it executed (so each runs
at most once, across its own restarts, and its result can be re-sent).

All methods block; the agent calls them from a worker thread.
"""

from __future__ import annotations

import pathlib
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

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
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        self.dropped_since_report = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

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
            return self._get("next_seq") or 1

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
        seq assignment and storage are one transaction (a crash never reuses a seq).
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._get("next_seq") or 1
                payload = payload_for_seq(seq)
                self._db.execute("INSERT INTO spool(seq, payload) VALUES(?, ?)", (seq, payload))
                self._set("next_seq", seq + 1)
                (count,) = self._db.execute("SELECT COUNT(*) FROM spool").fetchone()
                excess = count - self._max_spool
                if excess > 0:
                    # Oldest first: recent telemetry is worth more than old. The control plane
                    # sees the jump in seq and counts the gap.
                    self._db.execute(
                        "DELETE FROM spool WHERE seq IN "
                        "(SELECT seq FROM spool ORDER BY seq LIMIT ?)",
                        (excess,),
                    )
                    self.dropped_since_report += excess
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return int(seq)

    def unsent(self, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, payload FROM spool WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [(int(seq), bytes(payload)) for seq, payload in rows]

    def acknowledge(self, seq: int) -> None:
        """Drops every sample up to and including `seq` (the control plane holds them)."""
        with self._lock:
            self._db.execute("DELETE FROM spool WHERE seq <= ?", (seq,))

    def spool_bounds(self) -> tuple[int, int]:
        """(oldest seq in the spool or 0, number of samples in it)."""
        with self._lock:
            oldest, count = self._db.execute("SELECT MIN(seq), COUNT(*) FROM spool").fetchone()
        return int(oldest or 0), int(count)

    # -- executed commands ------------------------------------------------------------------

    def executed(self, command_id: str) -> ExecutedCommand | None:
        with self._lock:
            row = self._db.execute(
                "SELECT state, result FROM executed WHERE command_id = ?", (command_id,)
            ).fetchone()
        if row is None:
            return None
        return ExecutedCommand(command_id, row[0] == "FINISHED", row[1])

    def mark_started(self, command_id: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO executed(command_id, state, result, at) "
                "VALUES(?, 'STARTED', NULL, ?)",
                (command_id, time.time()),
            )

    def mark_finished(self, command_id: str, result: bytes) -> None:
        with self._lock:
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
