"""guardproxy.proxy_instances: the instance registry that routes cancel requests between instances.

Each running guardproxy instance holds one slot (1..255, written into the pid of
the backend keys it hands out) with the address where other instances forward
cancel requests meant for it, and keeps it with a heartbeat.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

S = "guardproxy"


def upgrade() -> None:
    now = sa.text("now()")
    op.create_table(
        "proxy_instances",
        sa.Column("slot", sa.SmallInteger, primary_key=True, autoincrement=False),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        sa.CheckConstraint("slot BETWEEN 1 AND 255", name="proxy_instances_slot_range"),
        schema=S,
    )


def downgrade() -> None:
    op.drop_table("proxy_instances", schema=S)
