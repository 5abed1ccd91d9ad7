"""Garbage collector settings for processes that hold many long-lived objects.

A control plane with thousands of agent sessions keeps hundreds of thousands of objects alive
for hours. With CPython's defaults, objects that live a few seconds (a pending read per
session, the latest sample per node) are promoted to the oldest generation at a high rate,
which triggers full collections of the whole heap every few seconds: each one stops the event
loop for hundreds of milliseconds at 5,000 agents. A larger first-generation threshold lets
those objects die young, and freezing what start-up created keeps it out of every collection.
Garbage is still freed by reference counting at once; only cycles wait a little longer.
"""

from __future__ import annotations

import gc


def tune_gc_for_long_lived_heap(gen0_threshold: int) -> None:
    """Freezes start-up objects and raises the first-generation threshold (0: leave as is)."""
    if gen0_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
