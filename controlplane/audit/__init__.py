"""The audit log: every mutating or refused call and every plan transition, stored and listed."""

from controlplane.audit._log import (
    AuditEvent,
    AuditFilter,
    AuditLog,
    InvalidPageToken,
    audit_row,
    new_event_id,
)

__all__ = [
    "AuditEvent",
    "AuditFilter",
    "AuditLog",
    "InvalidPageToken",
    "audit_row",
    "new_event_id",
]
