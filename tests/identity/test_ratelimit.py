"""The token bucket behind enrollment and login limits."""

from __future__ import annotations

from controlplane.auth.ratelimit import RateLimiter


def test_a_burst_is_allowed_then_calls_wait_for_the_refill() -> None:
    now = [0.0]
    limiter = RateLimiter(6, clock=lambda: now[0])  # 6 per minute: one every 10 s
    assert [limiter.acquire("10.0.0.1") for _ in range(6)] == [0.0] * 6
    assert round(limiter.acquire("10.0.0.1"), 6) == 10.0
    now[0] = 10.0
    assert limiter.acquire("10.0.0.1") == 0.0
    assert limiter.acquire("10.0.0.2") == 0.0  # another caller has its own bucket


def test_memory_stays_bounded_and_forgetting_only_forgives() -> None:
    limiter = RateLimiter(1, burst=1, max_keys=2, clock=lambda: 0.0)
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") > 0
    limiter.acquire("b")
    limiter.acquire("c")  # "a" is forgotten
    assert limiter.acquire("a") == 0.0
