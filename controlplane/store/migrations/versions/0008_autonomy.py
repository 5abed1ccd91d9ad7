"""The autonomy breaker (one row: tripped or not, why, and the last reset), and an index on
plans' last change, so planner calibration reads only the plans that ended recently.

Revision ID: 0008_autonomy
Revises: 0007_disruption_budgets
"""

import sqlalchemy as sa
from alembic import op

from controlplane.store._models import UtcDateTime

revision = "0008_autonomy"
down_revision = "0007_disruption_budgets"
branch_labels = None
depends_on = None


def upgrade() -> None:
    breaker = op.create_table(
        "autonomy_breaker",
        sa.Column("breaker_id", sa.Integer(), primary_key=True),
        sa.Column("tripped", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("trip_time", UtcDateTime(), nullable=True),
        sa.Column("tripped_by", sa.String(128), nullable=False),
        sa.Column("reset_by", sa.String(512), nullable=False),
        sa.Column("reset_time", UtcDateTime(), nullable=True),
        sa.Column("reset_reason", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
    )
    op.bulk_insert(
        breaker,
        [
            {
                "breaker_id": 1,
                "tripped": False,
                "reason": "",
                "trip_time": None,
                "tripped_by": "",
                "reset_by": "",
                "reset_time": None,
                "reset_reason": "",
                "version": 1,
            }
        ],
    )
    op.create_index("ix_plans_updated", "plans", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_plans_updated", table_name="plans")
    op.drop_table("autonomy_breaker")
