"""Identity lifecycle: bootstrap tokens, issued certificates, revocations, password users.

Revision ID: 0003_identity
Revises: 0002_plans
"""

import sqlalchemy as sa
from alembic import op

from controlplane.store._models import UtcDateTime

revision = "0003_identity"
down_revision = "0002_plans"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bootstrap_tokens",
        sa.Column("token_id", sa.String(32), primary_key=True),
        sa.Column("secret_hash", sa.String(128), nullable=False),
        sa.Column("node_pattern", sa.String(128), nullable=False),
        sa.Column("max_uses", sa.Integer(), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("expires_at", UtcDateTime(), nullable=False),
        sa.Column("created_by", sa.String(512), nullable=False),
    )
    op.create_table(
        "issued_certificates",
        sa.Column("serial", sa.String(64), primary_key=True),
        sa.Column("node_id", sa.String(128), nullable=False),
        sa.Column("spiffe_id", sa.String(512), nullable=False),
        sa.Column("issued_at", UtcDateTime(), nullable=False),
        sa.Column("not_after", UtcDateTime(), nullable=False),
        sa.Column("via", sa.String(16), nullable=False),
    )
    op.create_index("ix_issued_certificates_node", "issued_certificates", ["node_id", "issued_at"])
    op.create_table(
        "revocations",
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("value", sa.String(128), primary_key=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("revoked_at", UtcDateTime(), nullable=False),
        sa.Column("revoked_by", sa.String(512), nullable=False),
    )
    op.create_table(
        "users",
        sa.Column("username", sa.String(128), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.String(256), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("users")
    op.drop_table("revocations")
    op.drop_index("ix_issued_certificates_node", table_name="issued_certificates")
    op.drop_table("issued_certificates")
    op.drop_table("bootstrap_tokens")
