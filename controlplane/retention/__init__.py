"""Retention: old audit events, finished commands, ended plans, departed nodes and domain
events are deleted after a configurable time, in small batches, so the database stops growing."""

from controlplane.retention._pruner import (
    BATCH_PAUSE_S,
    BATCH_ROWS,
    Retention,
    RetentionPolicy,
)

__all__ = ["BATCH_PAUSE_S", "BATCH_ROWS", "Retention", "RetentionPolicy"]
