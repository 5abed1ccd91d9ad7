"""How long to wait before repeating a call that is safe to repeat, or that it should not be
repeated: capped exponential backoff with full jitter, the server's retry delay first."""

from __future__ import annotations

import random
from collections.abc import Callable

import grpc

from sentinelclient._errors import SentinelError
from sentinelclient._settings import RetryPolicy

# A connection that failed or an answer that did not come in time: the request may or may not
# have been carried out, so only calls that are safe to repeat are repeated.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Refusals that come with a retry delay say "not now" rather than "no".
_WITH_SERVER_DELAY = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})
_SERVER_DELAY_JITTER = 0.2


class Backoff:
    """The retry schedule of one call: `delay_after` each failed attempt."""

    def __init__(self, policy: RetryPolicy, rng: Callable[[], float] = random.random) -> None:
        self._policy = policy
        self._rng = rng
        self.attempts = 0

    def delay_after(self, error: SentinelError) -> float | None:
        """Seconds to wait before the next attempt, or None: give up and raise `error`."""
        self.attempts += 1
        policy = self._policy
        if self.attempts >= policy.max_attempts:
            return None
        server = error.retry_after_s
        if server is not None and error.code in _WITH_SERVER_DELAY:
            if server > policy.max_server_delay_s:
                return None
            # A little later than asked, so clients told the same delay do not return together.
            return server * (1 + _SERVER_DELAY_JITTER * self._rng())
        if error.code not in RETRYABLE:
            return None
        growth = policy.multiplier ** (self.attempts - 1)
        cap = min(policy.max_backoff_s, policy.initial_backoff_s * growth)
        return cap * self._rng()
