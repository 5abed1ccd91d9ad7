"""The agent's spool: one transaction per sample, acknowledgements applied with the next write,
the bound kept without scanning, and a seq never reused across restarts, crashes included."""

from __future__ import annotations

import pathlib
import sqlite3

from nodeagent._state import AgentStateStore


def _payload(seq: int) -> bytes:
    return b"sample-%d" % seq


def _rows(path: pathlib.Path) -> list[int]:
    """The seqs in the spool as another reader of the file sees them (committed data only)."""
    reader = sqlite3.connect(path)
    try:
        return [seq for (seq,) in reader.execute("SELECT seq FROM spool ORDER BY seq")]
    finally:
        reader.close()


def test_acknowledged_samples_go_with_the_next_write_and_are_not_offered_again(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "agent.db"
    store = AgentStateStore(path, max_spool_samples=100)
    try:
        assert [store.spool(_payload) for _ in range(5)] == [1, 2, 3, 4, 5]

        store.note_acknowledged(3)  # what the session does on the event loop: no I/O

        assert _rows(path) == [1, 2, 3, 4, 5]
        assert store.spool_bounds() == (4, 2)  # acknowledged ones no longer count
        assert [seq for seq, _ in store.unsent(3, 10)] == [4, 5]
        assert store.spool(_payload) == 6
        assert _rows(path) == [4, 5, 6]
        assert store.spool_bounds() == (4, 3)
    finally:
        store.close()


def test_the_bound_drops_the_oldest_and_counts_them_once(tmp_path: pathlib.Path) -> None:
    store = AgentStateStore(tmp_path / "agent.db", max_spool_samples=3)
    try:
        for _ in range(5):
            store.spool(_payload)
        store.note_acknowledged(4)
        store.spool(_payload)

        assert store.spool_bounds() == (5, 2)
        assert _rows(tmp_path / "agent.db") == [5, 6]
        assert store.dropped_total == 2
        assert store.take_dropped() == 2
        assert store.take_dropped() == 0
    finally:
        store.close()


def test_a_seq_is_never_reused_after_everything_was_acknowledged_and_the_agent_restarts(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "agent.db"
    store = AgentStateStore(path, max_spool_samples=100)
    for _ in range(4):
        store.spool(_payload)
    store.acknowledge(4)  # the spool is empty now
    assert _rows(path) == []
    store.close()

    reopened = AgentStateStore(path, max_spool_samples=100)
    try:
        assert reopened.next_seq() == 5
        assert reopened.spool(_payload) == 5
    finally:
        reopened.close()


def test_a_seq_is_never_reused_after_a_crash(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "agent.db"
    store = AgentStateStore(path, max_spool_samples=100)
    for _ in range(3):
        store.spool(_payload)
    store.note_acknowledged(3)
    assert store.spool(_payload) == 4  # deletes 1-3 in the same transaction
    # A crash: nothing closed, nothing flushed beyond what was committed; a second store on
    # the same file sees what a restarted agent would.
    after_crash = AgentStateStore(path, max_spool_samples=100)
    try:
        assert _rows(path) == [4]
        assert after_crash.next_seq() == 5
        after_crash.acknowledge(4)
    finally:
        after_crash.close()
    again = AgentStateStore(path, max_spool_samples=100)
    try:
        assert again.next_seq() == 5
    finally:
        again.close()
        store.close()


def test_command_records_survive_a_reopen_and_the_spool_stays_on_normal_sync(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "agent.db"
    store = AgentStateStore(path, max_spool_samples=100)
    store.mark_started("cmd-1")
    store.mark_finished("cmd-1", b"done")
    store.mark_started("cmd-2")
    # Command records are written with synchronous=FULL; the connection returns to NORMAL
    # for the spool (1 = NORMAL).
    assert store._db.execute("PRAGMA synchronous").fetchone() == (1,)
    store.close()

    reopened = AgentStateStore(path, max_spool_samples=100)
    try:
        finished = reopened.executed("cmd-1")
        started = reopened.executed("cmd-2")
        assert finished is not None and finished.finished and finished.result == b"done"
        assert started is not None and not started.finished
        assert reopened.last_executed_command_id() == "cmd-2"
    finally:
        reopened.close()
