"""Plans, their targets and transitions, policies, the audit log, leases; cordoned nodes.

Revision ID: 0002_plans
Revises: 0001_fleet
"""

import sqlalchemy as sa
from alembic import op

from controlplane.store._models import UtcDateTime

revision = "0002_plans"
down_revision = "0001_fleet"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.add_column(
            sa.Column("cordoned", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_table(
        "plans",
        sa.Column("plan_id", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(128), nullable=False, unique=True),
        sa.Column("request_digest", sa.String(64), nullable=False),
        sa.Column("source", sa.String(128), nullable=False),
        sa.Column("rationale", sa.Text(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("submitted_by", sa.String(512), nullable=False),
        sa.Column("phase", sa.String(24), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.Column("expire_at", UtcDateTime(), nullable=True),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("violations", sa.JSON(), nullable=False),
        sa.Column("status_message", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
    )
    op.create_index("ix_plans_phase", "plans", ["phase"])
    op.create_index("ix_plans_source_created", "plans", ["source", "created_at"])
    op.create_table(
        "plan_targets",
        sa.Column("plan_id", sa.String(64), primary_key=True),
        sa.Column("target", sa.String(512), primary_key=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
    )
    op.create_index("ix_plan_targets_target_created", "plan_targets", ["target", "created_at"])
    op.create_table(
        "plan_transitions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("plan_id", sa.String(64), nullable=False),
        sa.Column("from_phase", sa.String(24), nullable=False),
        sa.Column("to_phase", sa.String(24), nullable=False),
        sa.Column("at", UtcDateTime(), nullable=False),
        sa.Column("actor", sa.String(512), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
    )
    op.create_index("ix_plan_transitions_plan", "plan_transitions", ["plan_id", "id"])
    op.create_table(
        "policies",
        sa.Column("policy_id", sa.String(128), primary_key=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("rules", sa.JSON(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("origin", sa.String(512), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
    )
    op.create_table(
        "audit_events",
        sa.Column("event_id", sa.String(64), primary_key=True),
        sa.Column("at", UtcDateTime(), nullable=False),
        sa.Column("principal", sa.String(512), nullable=False),
        sa.Column("method", sa.String(256), nullable=False),
        sa.Column("target", sa.String(512), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
    )
    op.create_index("ix_audit_time", "audit_events", ["at"])
    op.create_index("ix_audit_principal_time", "audit_events", ["principal", "at"])
    op.create_index("ix_audit_target_time", "audit_events", ["target", "at"])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(256), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", UtcDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_table("audit_events")
    op.drop_table("policies")
    op.drop_table("plan_transitions")
    op.drop_table("plan_targets")
    op.drop_table("plans")
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("cordoned")
