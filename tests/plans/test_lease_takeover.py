"""A control plane SIGKILLed while it leads is replaced as soon as its replica is provably
dead (heartbeat stale), not only when its controller lease runs out."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError, ProgrammingError

from tests.conftest import Pki, eventually
from tests.replicas._rig import free_port, start_replica


def _lease_holder(database_url: str) -> str | None:
    engine = create_engine(database_url)
    try:
        with engine.connect() as db:
            row = db.execute(text("SELECT holder FROM leases")).first()
    except (OperationalError, ProgrammingError):  # no tables yet
        return None
    finally:
        engine.dispose()
    return str(row[0]) if row else None


async def test_a_restarted_control_plane_takes_the_lease_of_its_dead_predecessor_early(
    pki: Pki, database_url: str, tmp_path: Path
) -> None:
    lease_s, stale_s = 60.0, 2.0
    flags = ("--controller-lease-s", str(lease_s), "--replica-stale-after-s", str(stale_s))
    port = free_port()
    first = start_replica(pki, database_url, tmp_path / "1.log", port, "first", *flags)
    second = None
    try:
        await eventually(lambda: _lease_holder(database_url) == "first", timeout=20)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        killed = time.monotonic()
        second = start_replica(pki, database_url, tmp_path / "2.log", port, "second", *flags)
        await eventually(lambda: _lease_holder(database_url) == "second", timeout=20)
        took = time.monotonic() - killed
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(10)
    # Without the heartbeat check the successor would wait out the whole 60 s lease.
    assert took < lease_s / 4, f"the lease changed hands {took:.1f} s after the kill"
    assert "taking the pipeline-controller lease from first" in (tmp_path / "2.log").read_text()
