"""What Postgres sees of a delegation: ``guard.principals``, ``guard.task``, ``guard.token_id``.

The proxy makes the verified principals, task and token id visible to the database
as custom settings, so that row-level security policies written by the database
owner can use them (as PostgREST does with its JWT claims):

* `settings_sql(delegation)` is the statement the proxy sends on a server connection
  before the first statement of a client's transaction runs there (on attach, outside
  any transaction block, so the values cannot be rolled back to another client's).
  It always sets all three names, to empty strings for a session without a token, so
  nothing is left over from the previous client of that server connection. The
  principals are joined with commas (a principal never holds one: claims.py).
* Only a verified token ever fills them: principals an agent *declares* (``SET
  guard.principals`` of a ``delegation: off`` type) stay in guardproxy's context.
* An agent cannot change them in between: ``SET guard.*`` is guardproxy's own context
  (never sent upstream on its own; refused in a message with other statements, and
  ``set_config('guard.…')`` is refused, by the judge), and the role the agent's
  statements run as cannot run anything else that sets them.
* ``RESET ALL`` / ``DISCARD ALL`` from the agent set them back to empty, which hides
  rows rather than showing more; the proxy sets them again before the next statement.

`rls_policy_sql(...)` writes the RLS policy for a table with a principal column, and
`rls_for_policy_set(...)` for the agent types of a policy set (``guardproxy roles
--rls``, ``guardproxy token rls`` print it); docs/delegation.md shows it working end to
end.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from guardproxy.policy.names import parse_relation_name, quote_ident, quote_literal

from .claims import Delegation

if TYPE_CHECKING:
    from guardproxy.policy.loader import PolicySet

PRINCIPALS = "guard.principals"
TASK = "guard.task"
TOKEN_ID = "guard.token_id"
#: The settings the proxy owns in Postgres; agents may never set them there.
RESERVED = (PRINCIPALS, TASK, TOKEN_ID)
#: The RLS policy keeping every row for agent types without delegation tokens.
OFF_POLICY = "guard_no_delegation"


def delegation_settings(delegation: Delegation | None) -> dict[str, str]:
    """The values of the three settings for a session (empty without a token)."""
    if delegation is None:
        return dict.fromkeys(RESERVED, "")
    return {
        PRINCIPALS: ",".join(delegation.principals),
        TASK: delegation.task or "",
        TOKEN_ID: delegation.token_id,
    }


def settings_sql(delegation: Delegation | None) -> str:
    """``SET guard.principals = '42,43'; SET guard.task = ...; SET guard.token_id = ...``.

    One simple Query; its answer is three CommandComplete ``SET`` and ReadyForQuery.
    Values are string literals quoted for any ``standard_conforming_strings``; a value
    with a NUL character cannot reach Postgres and raises ValueError (claims.py never
    lets one through).
    """
    parts = []
    for name, value in delegation_settings(delegation).items():
        if "\x00" in value:
            raise ValueError(f"{name}: a value with a NUL character cannot be set")
        parts.append(f"SET {name} = {quote_literal(value)}")
    return "; ".join(parts)


def settings_change(
    sent: Mapping[str, str] | None, delegation: Delegation | None
) -> tuple[str | None, dict[str, str]]:
    """(the statement to send, or None when `sent` already holds these values; the values).

    `sent`: what this server connection was last given (None: unknown, e.g. after the
    agent's RESET ALL / DISCARD ALL, which the judge reports as ``reapply_settings``).
    A new server connection has the three settings unset, which RLS reads like empty
    values: start it at ``delegation_settings(None)``.
    """
    values = delegation_settings(delegation)
    if sent is not None and dict(sent) == values:
        return None, values
    return settings_sql(delegation), values


def principals_array(column_type: str | None = None) -> str:
    """SQL for the verified principals as an array (empty or NULL: no row matches)."""
    array = f"string_to_array(nullif(current_setting({quote_literal(PRINCIPALS)}, true), ''), ',')"
    return f"{array}::{column_type}[]" if column_type else array


def rls_policy_sql(
    table: str,
    principal_column: str,
    roles: list[str],
    column_type: str | None = None,
    schema: str | None = None,
    policy_name: str = "guard_principals",
    other_roles: Sequence[str] = (),
) -> str:
    """Row-level security for `table`: the agents' roles see and write only the rows of
    the principals of their verified token.

    `column_type` (``bigint``, ``uuid``, ...) compares the column with the principals
    cast to its type, which can use an index; without it the column is compared as
    text. `roles` are the upstream roles of the agent types that take delegation
    tokens; `other_roles` those of agent types that use the table without tokens
    (``delegation: off``): they get a policy keeping every row their grants give
    them, since once RLS is on a role without a policy sees no rows.
    """
    target = quote_ident(table) if schema is None else f"{quote_ident(schema)}.{quote_ident(table)}"
    column = quote_ident(principal_column)
    if column_type:
        predicate = f"{column} = ANY ({principals_array(column_type)})"
    else:
        predicate = f"{column}::text = ANY ({principals_array()})"
    to = ", ".join(quote_ident(r) for r in roles) or "PUBLIC"
    lines = [
        f"-- Row-level security on {target} for {to}: their sessions see and change only",
        "-- the rows of the principals named by the agent's verified delegation token",
        "-- (guard.principals, set by guardproxy before each transaction; empty without a",
        "-- token: no rows).",
        f"ALTER TABLE {target} ENABLE ROW LEVEL SECURITY;",
        f"DROP POLICY IF EXISTS {quote_ident(policy_name)} ON {target};",
        f"CREATE POLICY {quote_ident(policy_name)} ON {target} FOR ALL TO {to}",
        f"    USING ({predicate})",
        f"    WITH CHECK ({predicate});",
    ]
    if other_roles:
        others = ", ".join(quote_ident(r) for r in other_roles)
        lines += [
            f"-- {others}: agent types without delegation tokens (delegation: off) keep",
            "-- the rows their grants give them (a role without a policy would see none):",
            f"DROP POLICY IF EXISTS {quote_ident(OFF_POLICY)} ON {target};",
            f"CREATE POLICY {quote_ident(OFF_POLICY)} ON {target} FOR ALL TO {others} USING (true);",
        ]
    return "\n".join(
        [
            *lines,
            "-- Once RLS is on, roles without a policy see no rows (the table owner and",
            "-- BYPASSRLS roles excepted): give the application's own roles one, e.g.",
            f"-- CREATE POLICY app_all ON {target} FOR ALL TO app_role USING (true);",
            "",
        ]
    )


def rls_for_policy_set(
    policy_set: PolicySet, table: str, column: str, column_type: str | None = None
) -> str:
    """`rls_policy_sql` for the agent types whose policy lists `table` (``guardproxy
    roles --rls``, ``guardproxy token rls``): the roles of those that take delegation
    tokens get the principals' rows, the others keep theirs. ValueError when no type
    that takes tokens lists `table`, or `table` is no name."""
    schema, name = parse_relation_name(table)
    users = [
        policy
        for policy in policy_set
        if any((rule.schema, rule.name) == (schema, name) for rule in policy.tables)
    ]
    roles = _distinct(p.upstream_role for p in users if p.document.delegation != "off")
    if not roles:
        if not users:
            raise ValueError(f"no agent type lists {table} in its tables")
        raise ValueError(
            f"no agent type that takes delegation tokens lists {table} ("
            f"{', '.join(p.name for p in users)} list it, with delegation: off): set "
            "delegation: optional or required in the policy of the agents that act for "
            "principals"
        )
    others = [r for r in _distinct(p.upstream_role for p in users) if r not in roles]
    return rls_policy_sql(name, column, roles, column_type, schema, other_roles=others)


def _distinct(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))
