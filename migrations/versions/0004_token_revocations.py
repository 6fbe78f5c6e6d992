"""guardproxy.token_revocations: revoked delegation tokens, honoured by every instance.

One row per revocation: of one token (kind 'token', value its jti) or of every token
acting for a principal issued before revoked_at (kind 'principal'), for one issuer or
for every issuer (issuer ''). See guardproxy/delegation/revocations.py.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

S = "guardproxy"


def upgrade() -> None:
    op.create_table(
        "token_revocations",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("issuer", sa.Text, nullable=False, server_default=""),
        sa.Column(
            "revoked_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("revoked_by", sa.Text, nullable=False),
        sa.Column("reason", sa.Text),
        sa.CheckConstraint("kind IN ('token', 'principal')", name="token_revocations_kind"),
        sa.UniqueConstraint("kind", "value", "issuer", name="token_revocations_once"),
        schema=S,
    )


def downgrade() -> None:
    op.drop_table("token_revocations", schema=S)
