"""guardproxy.refuse_soft_deleted(): an upsert must not bring a soft-deleted row back silently.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION guardproxy.refuse_soft_deleted(deleted_at timestamptz, table_name text)
        RETURNS boolean LANGUAGE plpgsql AS $fn$
        BEGIN
            IF deleted_at IS NULL THEN
                RETURN true;
            END IF;
            RAISE EXCEPTION USING
                ERRCODE = '23505',
                MESSAGE = format('the conflicting row of %s was soft-deleted at %s; '
                                 'the upsert would bring it back silently', table_name, deleted_at),
                HINT = 'restore it with `guardproxy undo --task ...`, or insert under a new key';
        END
        $fn$
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION guardproxy.refuse_soft_deleted(timestamptz, text)")
