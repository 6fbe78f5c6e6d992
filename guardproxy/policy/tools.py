"""Pure functions behind the policy CLI commands (``check``, ``explain``, ``roles``,
``soft-delete sql``).

The CLI only parses arguments, builds a catalog when asked (``--upstream DSN``:
`CATALOG_QUERY` as the agent type's role, or ``--schema FILE``:
`Catalog.from_ddl`), calls these and prints / exits:

* `check_report(directory) -> (exit_code, text)`: 0 and a summary per agent type,
  or 1 and every error.
* `explain(policy_set, agent_id, sql, catalog=None) -> dict` with keys ``decision``
  (allow / deny / rewrite), ``rule``, ``reason``, ``sql`` (exactly what would be sent
  upstream; None when denied), plus ``hint``, ``sqlstate``, ``agent_type``,
  ``monitored`` and ``notices`` (what the proxy tells the client as NOTICEs). Exit code: 0 unless ``decision == "deny"``. `explain_text()` renders
  it for humans.
* `roles_sql(policy_set, catalog=None, proxy_login=None) -> str`: SQL that gives the
  database the same limits, as defence in depth (`guardproxy.onboarding.roles`).
* `soft_delete_sql(table, columns=SoftDelete(), key=None) -> str`: the ALTER TABLE that
  adds the soft-delete columns (if missing), an index on ``deleted_at`` and a partial
  index of the live rows (``WHERE deleted_at IS NULL``) on `key`, by default the
  table's primary key as the database knows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..analysis.catalog import Catalog
from ..analysis.model import Op
from .agent import AgentPolicy, SoftDelete
from .context import SessionContext
from .engine import Judge
from .errors import PolicyError
from .loader import PolicySet, load_policy_set
from .names import parse_relation_name, quote_ident, quote_literal

_GRANTS = {
    Op.SELECT: "SELECT",
    Op.INSERT: "INSERT",
    Op.UPDATE: "UPDATE",
    Op.DELETE: "DELETE",
    Op.TRUNCATE: "TRUNCATE",
    Op.REFERENCES: "REFERENCES",
}  # ddl needs ownership and maintain a PostgreSQL 17 privilege: not granted here


def check_report(directory: str | Path) -> tuple[int, str]:
    """Validate a policy directory; (0, summary) or (1, all errors)."""
    try:
        policy_set = load_policy_set(directory)
    except PolicyError as exc:
        count = len(exc.errors)
        lines = [f"policy check failed: {count} error{'s' if count != 1 else ''}"]
        lines.extend(f"  {error}" for error in exc.errors)
        return 1, "\n".join(lines)
    lines = [
        f"{len(policy_set)} agent type{'s' if len(policy_set) != 1 else ''} in {directory}: OK"
    ]
    for policy in policy_set:
        lines.append(policy.summary())
    return 0, "\n".join(lines)


def explain(
    policy_set: PolicySet,
    agent_id: str,
    sql: str,
    catalog: Catalog | None = None,
    ctx: SessionContext | None = None,
    policy: AgentPolicy | None = None,
) -> dict[str, Any]:
    """What the proxy would do with `sql` from `agent_id` (see the module docstring);
    `policy`: judge with it (the agent's type narrowed by a delegation token) rather
    than with the type the agent id matches."""
    policy = policy or policy_set.match(agent_id)
    if policy is None:
        return {
            "decision": "deny",
            "rule": "agents",
            "reason": f"agent {agent_id!r} matches no agent type: no policy lists it in agents",
            "sql": None,
            "hint": "add the agent id or a matching pattern to the agents list of one policy",
            "sqlstate": "28000",
            "agent_type": None,
            "monitored": False,
            "notices": [],
        }
    decision = Judge(policy_set, catalog).judge(
        policy, sql, ctx or SessionContext(agent_id=agent_id)
    )
    return {
        "decision": decision.action,
        "rule": decision.rule,
        "reason": decision.reason,
        "sql": None if decision.action == "deny" else decision.sql,
        "hint": decision.hint,
        "sqlstate": decision.sqlstate,
        "agent_type": policy.name,
        "monitored": decision.monitored,
        "notices": list(decision.notices),
    }


def explain_text(result: dict[str, Any]) -> str:
    lines = [
        f"decision: {result['decision']}" + (" (monitor mode)" if result.get("monitored") else "")
    ]
    if result.get("agent_type"):
        lines.append(f"agent type: {result['agent_type']}")
    if result.get("rule"):
        lines.append(f"rule: {result['rule']}")
    if result.get("reason"):
        lines.append(f"reason: {result['reason']}")
    if result.get("hint"):
        lines.append(f"hint: {result['hint']}")
    if result.get("sql") is not None:
        lines.append(f"sql: {result['sql']}")
    lines.extend(f"notice: {notice}" for notice in result.get("notices") or ())
    return "\n".join(lines)


def roles_sql(policy_set: PolicySet, catalog: Any = None, proxy_login: str | None = None) -> str:
    """The script of ``guardproxy roles`` (`guardproxy.onboarding.roles`, which also takes a
    `DbSchema` to grant sequences and the proxy login's needs)."""
    from ..onboarding.roles import roles_sql as script  # the onboarding layer builds on this

    return script(policy_set, catalog, proxy_login)


def soft_delete_sql(
    table: str, columns: SoftDelete | None = None, key: Sequence[str] | None = None
) -> str:
    """The DDL that prepares `table` for ``soft_delete`` (see the module docstring).

    Raises ValueError when `table` is not a table name.
    """
    schema, name = parse_relation_name(table)
    soft = columns or SoftDelete()
    target = f"{quote_ident(schema)}.{quote_ident(name)}" if schema else quote_ident(name)
    deleted_at = quote_ident(soft.deleted_at)
    at_index = quote_ident(_index_name(name, soft.deleted_at, "idx"))
    live_index = quote_ident(_index_name(name, "live", "idx"))
    lines = [
        f"-- Soft delete for {table}: guardproxy turns an agent's DELETE into an UPDATE of",
        f"-- these columns and hides rows with {soft.deleted_at} set from agents.",
        f"ALTER TABLE {target}",
        f"    ADD COLUMN IF NOT EXISTS {deleted_at} timestamptz,",
        f"    ADD COLUMN IF NOT EXISTS {quote_ident(soft.deleted_by)} text,",
        f"    ADD COLUMN IF NOT EXISTS {quote_ident(soft.reason)} text;",
        "-- what was deleted when (guardproxy audit deletes, undo)",
        f"CREATE INDEX IF NOT EXISTS {at_index} ON {target} ({deleted_at});",
    ]
    if key:
        keys = ", ".join(quote_ident(c) for c in key)
        lines += [
            "-- the live rows, which is what agents read",
            f"CREATE INDEX IF NOT EXISTS {live_index} ON {target} ({keys}) WHERE {deleted_at} IS NULL;",
        ]
    else:
        regclass = quote_literal(target)
        lines += [
            "-- the live rows, which is what agents read: on the primary key",
            "DO $guard$",
            "DECLARE keys text;",
            "BEGIN",
            "    SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY k.n) INTO keys",
            "    FROM pg_catalog.pg_index i,",
            "         unnest(i.indkey::pg_catalog.int2[]) WITH ORDINALITY AS k(attnum, n),",
            "         pg_catalog.pg_attribute a",
            f"    WHERE i.indrelid = {regclass}::regclass AND i.indisprimary",
            "      AND a.attrelid = i.indrelid AND a.attnum = k.attnum;",
            "    IF keys IS NULL THEN",
            f"        RAISE NOTICE {quote_literal(f'{table} has no primary key: no partial index of its live rows')};",
            "    ELSE",
            "        EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %s (%s) WHERE %I IS NULL',",
            f"                       {quote_literal(_index_name(name, 'live', 'idx'))}, {regclass}, keys, "
            f"{quote_literal(soft.deleted_at)});",
            "    END IF;",
            "END $guard$;",
        ]
    return "\n".join(lines) + "\n"


def _index_name(table: str, what: str, suffix: str) -> str:
    """``<table>_<what>_<suffix>``, cut to Postgres' 63 bytes like Postgres would."""
    name = f"{table}_{what}_{suffix}"
    while len(name.encode()) > 63:
        table = table[:-1]
        name = f"{table}_{what}_{suffix}"
    return name
