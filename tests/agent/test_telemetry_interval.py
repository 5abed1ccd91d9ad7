"""The collection loop's sleep: a new interval from the control plane or a command ends it at
once, so the agent never sleeps out an interval it was told to leave."""

from __future__ import annotations

import asyncio

from nodeagent._telemetry import TelemetryInterval


async def test_a_new_interval_ends_the_sleep_at_once() -> None:
    interval = TelemetryInterval(30.0)
    sleeping = asyncio.create_task(interval.sleep(30.0))
    await asyncio.sleep(0.01)
    assert not sleeping.done()

    interval.update(1.0)

    await asyncio.wait_for(sleeping, 1.0)
    assert interval.seconds == 1.0


async def test_without_a_change_the_sleep_lasts_its_time() -> None:
    loop = asyncio.get_running_loop()
    interval = TelemetryInterval(1.0)
    started = loop.time()

    await interval.sleep(0.05)

    assert loop.time() - started >= 0.05
    # A change with nobody asleep is not remembered for the next sleep.
    interval.update(2.0)
    started = loop.time()
    await interval.sleep(0.05)
    assert loop.time() - started >= 0.05


async def test_a_pinned_interval_ignores_the_control_planes_suggestion() -> None:
    interval = TelemetryInterval(5.0)
    interval.pinned = True
    sleeping = asyncio.create_task(interval.sleep(0.2))
    await asyncio.sleep(0.01)

    interval.suggest(1.0)

    await asyncio.sleep(0.05)
    assert not sleeping.done() and interval.seconds == 5.0
    await sleeping
