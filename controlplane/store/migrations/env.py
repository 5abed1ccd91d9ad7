"""Alembic environment: runs migrations on the engine the Store hands in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from controlplane.store._models import Base

# Any constant will do: replicas starting together take turns, the second finds the schema
# current (without it both would try to create the same tables).
_MIGRATION_LOCK = 0x53454E54

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
    context.configure(connection=connection, target_metadata=Base.metadata)
    with context.begin_transaction():
        context.run_migrations()
