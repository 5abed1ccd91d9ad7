"""Who may do what: the principal of the current call, the role table, rate limits.

Establishing the principal from a gRPC call (certificate, bearer token) is transport work and
lives in `controlplane.api`; this package holds what that work produces and consults."""

from controlplane.auth._principal import (
    Principal,
    current_principal,
    reset_principal,
    set_principal,
)
from controlplane.auth.ratelimit import RateLimiter

__all__ = ["Principal", "RateLimiter", "current_principal", "reset_principal", "set_principal"]
