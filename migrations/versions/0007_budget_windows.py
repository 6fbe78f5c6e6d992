"""guardproxy.budget_usage: what each agent and agent type wrote, in slices of time, so that
budgets over a rolling window hold whatever task names an agent uses.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "budget_usage",
        sa.Column("scope", sa.Text, nullable=False),  # per_agent or per_agent_type
        sa.Column("subject", sa.Text, nullable=False),  # the agent id or the agent type
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),  # start of a slice
        sa.Column("statements", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("rows_written", sa.BigInteger, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("scope", "subject", "bucket"),
        schema="guardproxy",
    )


def downgrade() -> None:
    op.drop_table("budget_usage", schema="guardproxy")
