"""Token-bucket rate limits keyed by caller (peer address, user name): enrollment and login
use them against guessing and floods."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable


class RateLimiter:
    """Each key may make `per_minute` calls per minute on average and `burst` at once.

    Memory is bounded: past `max_keys` keys, the least recently used key is forgotten, which
    only ever forgives (never blocks) a caller.
    """

    def __init__(
        self,
        per_minute: float,
        *,
        burst: float | None = None,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_minute <= 0:
            raise ValueError("per_minute must be positive")
        self._rate = per_minute / 60.0
        self._burst = burst if burst is not None else max(per_minute, 1.0)
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def acquire(self, key: str) -> float:
        """Takes one call for `key`: 0.0 when allowed, else the seconds until it would be."""
        now = self._clock()
        tokens, last = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self._rate
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait
