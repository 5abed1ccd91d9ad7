"""Refresh families: one row per password login, naming the only refresh token of that login
that may still be used (refresh tokens rotate; reusing an old one revokes the login).

Revision ID: 0006_refresh_families
Revises: 0005_events
"""

import sqlalchemy as sa
from alembic import op

from controlplane.store._models import UtcDateTime

revision = "0006_refresh_families"
down_revision = "0005_events"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "refresh_families",
        sa.Column("login_id", sa.String(32), primary_key=True),
        sa.Column("username", sa.String(128), nullable=False),
        sa.Column("current_token_id", sa.String(32), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("rotated_at", UtcDateTime(), nullable=False),
        sa.Column("expires_at", UtcDateTime(), nullable=False),
        sa.Column("revoked_at", UtcDateTime(), nullable=True),
        sa.Column("revoked_reason", sa.Text(), nullable=False),
    )
    op.create_index("ix_refresh_families_username", "refresh_families", ["username"])
    op.create_index("ix_refresh_families_expires_at", "refresh_families", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_refresh_families_expires_at", table_name="refresh_families")
    op.drop_index("ix_refresh_families_username", table_name="refresh_families")
    op.drop_table("refresh_families")
