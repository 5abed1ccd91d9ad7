"""A full disk under the agent's state directory (a small tmpfs): samples are dropped and
counted as a gap, the session goes on, commands are never run without their record; an
unusable state directory at start is exit code 2."""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from controlplane import ControlPlane
from nodeagent._state import AgentStateStore, StateFull
from nodeagent.main import main as agent_main
from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually

TMPFS_SIZE = "2m"


@pytest.fixture
def small_disk(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A 2 MB tmpfs mounted for the test (needs root, or CAP_SYS_ADMIN)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: pathlib.Path, name: str = "filler") -> pathlib.Path:
    """Takes every byte left on the filesystem with one file (appending to it)."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        chunk = 64 * 1024
        while chunk:
            try:
                os.write(fd, b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                chunk //= 2
    finally:
        os.close(fd)
    return path


def _payload(seq: int) -> bytes:
    return seq.to_bytes(8, "big") * 256  # 2 KiB


def test_full_disk_drops_samples_counts_them_and_keeps_command_records(
    small_disk: pathlib.Path,
) -> None:
    store = AgentStateStore(small_disk / "agent.db", max_spool_samples=100_000)
    assert (small_disk / "agent.reserve").exists()
    for _ in range(20):
        store.spool(_payload)
    filler = fill(small_disk)

    seqs = [store.spool(_payload) for _ in range(400)]

    # Nothing raised, every sample got its own seq, and every seq is either still spooled or
    # counted as dropped (so it reaches the control plane as a gap, never silently).
    assert seqs == list(range(21, 421))
    assert store.disk_full
    assert not (small_disk / "agent.reserve").exists()
    assert store.dropped_total > 0
    _oldest, kept = store.spool_bounds()
    assert kept + store.dropped_total == 420
    # Command records come before samples: there is room for them on the full disk.
    store.mark_started("cmd-1")
    store.mark_finished("cmd-1", b"result-1")
    assert store.executed("cmd-1") == store.executed("cmd-1")
    executed = store.executed("cmd-1")
    assert executed is not None and executed.finished and executed.result == b"result-1"

    filler.unlink()
    assert store.spool(_payload) == 421
    assert not store.disk_full
    assert (small_disk / "agent.reserve").exists()
    store.close()

    reopened = AgentStateStore(small_disk / "agent.db", max_spool_samples=100_000)
    try:
        executed = reopened.executed("cmd-1")
        assert executed is not None and executed.finished and executed.result == b"result-1"
        assert reopened.next_seq() == 422
    finally:
        reopened.close()


def test_command_without_room_for_its_record_is_refused_not_run(
    small_disk: pathlib.Path,
) -> None:
    store = AgentStateStore(small_disk / "agent.db", max_spool_samples=100_000)
    try:
        fill(small_disk)
        # The first write that finds no room gives the reserve up; take that room too.
        assert store.spool(_payload) == 1
        fill(small_disk, "filler-2")
        for _ in range(50):
            store.spool(_payload)
        fill(small_disk, "filler-3")
        store.acknowledge(10**9)  # nothing may stay to be dropped for room

        with pytest.raises(StateFull, match="no room in the state directory"):
            for i in range(200):
                store.mark_started(f"cmd-{i}")
        assert store.executed(f"cmd-{i}") is None
    finally:
        store.close()


async def test_agent_keeps_its_session_and_telemetry_on_a_full_disk(
    control_plane: ControlPlane, agent_factory: AgentFactory, small_disk: pathlib.Path
) -> None:
    handle = await agent_factory("node-1", control_plane.port, state_dir=small_disk)
    agent = handle.agent
    session = agent.session_id
    await eventually(lambda: agent.acked_seq >= 3)

    fillers = [fill(small_disk)]

    def no_room_left() -> bool:
        # The agent gives its reserve up at the first write without room; take that too.
        fillers.append(fill(small_disk, f"filler-{len(fillers)}"))
        return not (small_disk / "agent.reserve").exists()

    await eventually(no_room_left, timeout=10, interval=0.3)
    fillers.append(fill(small_disk, "filler-last"))
    assert os.statvfs(small_disk).f_bavail == 0
    before = agent.acked_seq

    # Telemetry still flows: acknowledged samples make room for new ones in the spool.
    await eventually(lambda: agent.acked_seq > before + 10, timeout=15)
    # Commands get an answer: run with their record written first, or refused unrun.
    result = await control_plane.commands.send("node-1", "ping", {}, timeout=10)
    assert result.succeeded or (
        result.outcome == "FAILED"
        and "not run" in result.message
        and "disk is full" in result.message
    ), result
    for filler in fillers:
        filler.unlink()

    await eventually(lambda: (small_disk / "agent.reserve").exists(), timeout=10)
    mid = agent.acked_seq
    await eventually(lambda: agent.acked_seq > mid + 3, timeout=10)
    assert agent.session_id == session
    assert agent.sessions_opened == 1


async def test_samples_dropped_for_want_of_room_reach_the_control_plane_as_a_gap(
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    small_disk: pathlib.Path,
) -> None:
    """Disconnected on a full disk, the agent cannot keep what it collects: the samples that
    found no room are counted as a gap by the control plane once the node is back."""
    first = await control_plane_factory()
    port = first.port
    handle = await agent_factory("node-1", port, state_dir=small_disk)
    agent = handle.agent
    await eventually(lambda: agent.acked_seq >= 3)
    fillers = [fill(small_disk)]

    def no_room_left() -> bool:
        fillers.append(fill(small_disk, f"filler-{len(fillers)}"))
        return not (small_disk / "agent.reserve").exists()

    await eventually(no_room_left, timeout=10, interval=0.3)
    await first.stop()
    offline_from = agent.last_sample.seq
    # 0.2 s per sample: ~25 collected while nobody acknowledges and the spool may not grow.
    await eventually(lambda: agent.last_sample.seq >= offline_from + 25, timeout=15)
    for filler in fillers:
        filler.unlink()

    second = await control_plane_factory(listen=f"127.0.0.1:{port}")
    await eventually(lambda: agent.acked_seq > offline_from + 25, timeout=20)
    node = second.registry.get("node-1")
    assert node is not None
    await eventually(lambda: second.registry.get("node-1").telemetry_gap_samples >= 10)


def test_unwritable_state_directory_at_start_exits_2(
    pki: Pki, tmp_path: pathlib.Path, capfd: pytest.CaptureFixture[str]
) -> None:
    cert, key = pki.client("agent", "node-1")
    not_a_directory = tmp_path / "state"
    not_a_directory.write_text("a file where the state directory should be")

    # In this process: main() sets up the root logger (a handler on this test's captured
    # stderr, which closes with the test), so the test's logging is put back afterwards.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        code = agent_main(
            [
                "--node-id", "node-1", "--ca", str(pki.ca_path), "--cert", str(cert),
                "--key", str(key), "--state-dir", str(not_a_directory), "--metrics-listen", "",
            ]
        )  # fmt: skip
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)

    assert code == 2
    assert f"the state directory {not_a_directory} is not usable" in capfd.readouterr().err


def test_read_only_state_directory_at_start_exits_2(pki: Pki, tmp_path: pathlib.Path) -> None:
    """In its own process, as an operator would start it: exit code and the message."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        cert, key = pki.client("agent", "node-1")
        agent = subprocess.run(
            [
                sys.executable, "-m", "nodeagent.main", "--node-id", "node-1",
                "--ca", str(pki.ca_path), "--cert", str(cert), "--key", str(key),
                "--state-dir", str(read_only / "agent"), "--metrics-listen", "",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )  # fmt: skip
    finally:
        subprocess.run(["umount", "-l", str(read_only)], check=False)
    assert agent.returncode == 2, agent.stderr
    assert "is not usable" in agent.stderr and "Read-only file system" in agent.stderr
