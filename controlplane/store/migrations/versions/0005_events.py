"""Events: the stream of domain events (WatchEvents, sinks) and the sinks' delivered offsets.

Revision ID: 0005_events
Revises: 0004_replicas
"""

import sqlalchemy as sa
from alembic import op

from controlplane.store._models import UtcDateTime

revision = "0005_events"
down_revision = "0004_replicas"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column(
            "event_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("at", UtcDateTime(), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(512), nullable=False),
        sa.Column("replica_id", sa.String(64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_events_subject", "events", ["subject", "event_id"])
    op.create_table(
        "event_sink_offsets",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("last_event_id", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("event_sink_offsets")
    op.drop_index("ix_events_subject", table_name="events")
    op.drop_table("events")
