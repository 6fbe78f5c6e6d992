"""guardproxy.live_parent(): a write must not attach a child row to a soft-deleted parent.

The judge wraps each value an agent writes into a foreign key column whose parent
table is soft-deleted by its policy (guardproxy/policy/parents.py): the function looks
the parent row up and raises when it is marked deleted, else returns the value.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION guardproxy.live_parent(
            key anyelement, parent regclass, key_column text, deleted_column text,
            agent_type text, target text, rule text
        ) RETURNS anyelement LANGUAGE plpgsql AS $fn$
        DECLARE
            deleted timestamptz;
        BEGIN
            IF key IS NULL THEN
                RETURN key;
            END IF;
            EXECUTE format('SELECT %I FROM %s WHERE %I = $1', deleted_column, parent, key_column)
                INTO deleted USING key;
            IF deleted IS NOT NULL THEN
                RAISE EXCEPTION USING
                    ERRCODE = '23503',
                    MESSAGE = format('%s may not write %s = %s: the row of %s it refers to '
                                     'was soft-deleted at %s (policy %s, %s)',
                                     agent_type, target, key, parent, deleted, agent_type, rule),
                    HINT = format('refer to a row of %s that is not deleted (a deleted row '
                                  'comes back with `guardproxy undo --task ...`)', parent);
            END IF;
            RETURN key;
        END
        $fn$
        """
    )


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION guardproxy.live_parent(anyelement, regclass, text, text, text, text, text)"
    )
