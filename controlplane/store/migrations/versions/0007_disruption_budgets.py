"""Disruption budgets: one row per configured budget (locked while holds are taken, so two
plans racing for its last slot are decided one after the other, on every control plane), and
the holds plans keep on the nodes of a wave while it runs and is judged.

Revision ID: 0007_disruption_budgets
Revises: 0006_refresh_families
"""

import sqlalchemy as sa
from alembic import op

from controlplane.store._models import UtcDateTime

revision = "0007_disruption_budgets"
down_revision = "0006_refresh_families"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "disruption_budgets",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("node_limit", sa.Integer(), nullable=False),
        sa.Column("nodes_covered", sa.Integer(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
    )
    op.create_table(
        "disruption_holds",
        sa.Column("budget", sa.String(128), primary_key=True),
        sa.Column("node", sa.String(512), primary_key=True),
        sa.Column("plan_id", sa.String(64), primary_key=True),
        sa.Column("step_index", sa.Integer(), nullable=False),
        sa.Column("acquired_at", UtcDateTime(), nullable=False),
    )
    op.create_index("ix_disruption_holds_plan", "disruption_holds", ["plan_id"])


def downgrade() -> None:
    op.drop_index("ix_disruption_holds_plan", table_name="disruption_holds")
    op.drop_table("disruption_holds")
    op.drop_table("disruption_budgets")
