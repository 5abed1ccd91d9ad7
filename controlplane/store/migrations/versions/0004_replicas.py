"""Replicas: the replicas table (heartbeats, peer addresses, telemetry interest) and the agent
directory (which replica holds which agent's session).

Revision ID: 0004_replicas
Revises: 0003_identity
"""

import sqlalchemy as sa
from alembic import op

from controlplane.store._models import UtcDateTime

revision = "0004_replicas"
down_revision = "0003_identity"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("replica_id", sa.String(64), primary_key=True),
        sa.Column("address", sa.String(256), nullable=False),
        sa.Column("started_at", UtcDateTime(), nullable=False),
        sa.Column("heartbeat_at", UtcDateTime(), nullable=False),
        sa.Column("sessions", sa.Integer(), nullable=False),
        sa.Column("interest", sa.JSON(), nullable=False),
        sa.Column("interest_version", sa.BigInteger(), nullable=False),
    )
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("replica_id", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("session_id", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("connected_at", UtcDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("connected_at")
        batch.drop_column("session_id")
        batch.drop_column("replica_id")
    op.drop_table("replicas")
