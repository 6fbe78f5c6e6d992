"""Audit outcome and the insert check of row filters.

* ``guardproxy.audit_events.outcome``: what became of a write upstream,
  ``succeeded``, ``failed`` (Postgres refused it; ``reason`` holds its error) or
  ``undone`` (guardproxy rolled it back: a row cap, a budget); NULL for events
  that never reached the database (denials) and for rows written before 0006.
* ``guardproxy.check_insert(ok, message, hint)``: the check a row filter's
  ``insert`` condition puts on every row an agent inserts (like the ``WITH
  CHECK`` of row-level security): true when ``ok`` is true, otherwise an error
  42501 with the message and hint guardproxy wrote (NULL fails, as in Postgres).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

S = "guardproxy"


def upgrade() -> None:
    op.add_column("audit_events", sa.Column("outcome", sa.Text, nullable=True), schema=S)
    op.execute(
        """
        CREATE FUNCTION guardproxy.check_insert(ok boolean, message text, hint text)
        RETURNS boolean LANGUAGE plpgsql AS $fn$
        BEGIN
            IF ok THEN
                RETURN true;
            END IF;
            RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = message, HINT = hint;
        END
        $fn$
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION guardproxy.check_insert(boolean, text, text)")
    op.drop_column("audit_events", "outcome", schema=S)
