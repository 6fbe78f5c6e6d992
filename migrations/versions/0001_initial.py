"""guardproxy's own schema: audit log, deleted-row images, idempotency ledger, task budgets.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

S = "guardproxy"


def upgrade() -> None:
    now = sa.text("now()")
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        sa.Column("agent_id", sa.Text, nullable=False),
        sa.Column("agent_type", sa.Text, nullable=False),
        sa.Column("task", sa.Text),
        sa.Column("step", sa.Text),
        sa.Column("principals", postgresql.ARRAY(sa.Text)),
        sa.Column("statement", sa.Text, nullable=False),
        sa.Column("decision", sa.Text, nullable=False),
        sa.Column("rule", sa.Text),
        sa.Column("reason", sa.Text),
        sa.Column("rows", sa.BigInteger),
        sa.Column("duration_ms", sa.Double),
        sa.Column("tags", postgresql.JSONB),
        schema=S,
    )
    op.create_index("audit_events_agent_at", "audit_events", ["agent_id", "at"], schema=S)
    op.create_index("audit_events_task_at", "audit_events", ["task", "at"], schema=S)
    op.create_table(
        "deleted_rows",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        sa.Column("agent_id", sa.Text, nullable=False),
        sa.Column("task", sa.Text),
        sa.Column("step", sa.Text),
        sa.Column("reason", sa.Text),
        sa.Column("table_name", sa.Text, nullable=False),
        sa.Column("primary_key", postgresql.JSONB, nullable=False),
        sa.Column("row_image", postgresql.JSONB, nullable=False),
        sa.Column("restored_at", sa.DateTime(timezone=True)),
        schema=S,
    )
    op.create_index("deleted_rows_agent_at", "deleted_rows", ["agent_id", "at"], schema=S)
    op.create_index("deleted_rows_task", "deleted_rows", ["task"], schema=S)
    op.create_table(
        "idempotency_keys",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("agent_type", sa.Text, nullable=False),
        sa.Column("agent_id", sa.Text, nullable=False),
        sa.Column("task", sa.Text),
        sa.Column("request_hash", sa.Text, nullable=False),
        sa.Column("command_tag", sa.Text),
        sa.Column("response", sa.LargeBinary),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        schema=S,
    )
    op.create_index("idempotency_keys_expires", "idempotency_keys", ["expires_at"], schema=S)
    op.create_table(
        "task_budgets",
        sa.Column("task", sa.Text, primary_key=True),
        sa.Column("agent_type", sa.Text, nullable=False),
        sa.Column(
            "first_statement_at", sa.DateTime(timezone=True), server_default=now, nullable=False
        ),
        sa.Column("statements", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("rows_written", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        schema=S,
    )


def downgrade() -> None:
    op.drop_table("task_budgets", schema=S)
    op.drop_table("idempotency_keys", schema=S)
    op.drop_table("deleted_rows", schema=S)
    op.drop_table("audit_events", schema=S)
