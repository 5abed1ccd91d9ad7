"""Reconnect backoff: full jitter from the first retry, capped."""

from __future__ import annotations

import random

from nodeagent.agent import backoff_delay


def test_first_retry_is_jittered_and_delays_are_capped() -> None:
    rng = random.Random(7)
    first = [backoff_delay(0, 0.5, 30.0, rng) for _ in range(1000)]
    assert 0.0 <= min(first) < 0.05 and 0.45 < max(first) <= 0.5
    late = [backoff_delay(20, 0.5, 30.0, rng) for _ in range(1000)]
    assert max(late) <= 30.0 and min(late) < 3.0
    # The bound doubles per attempt until the cap.
    assert max(backoff_delay(3, 0.5, 30.0, rng) for _ in range(1000)) <= 4.0
