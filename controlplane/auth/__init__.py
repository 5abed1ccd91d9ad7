"""Authentication (peer certificate → principal) and authorization (role table)."""

from controlplane.auth._principal import Principal, current_principal

__all__ = ["Principal", "current_principal"]
