"""Pure functions behind the policy CLI commands (``check``, ``explain``, ``roles``,
``soft-delete sql``).

The CLI only parses arguments, builds a catalog when asked (``--upstream DSN``:
`CATALOG_QUERY` as the agent type's role, or ``--schema FILE``:
`Catalog.from_ddl`), calls these and prints / exits:

* `check_report(directory) -> (exit_code, text)`: 0 and a summary per agent type,
  or 1 and every error.
* `explain(policy_set, agent_id, sql, catalog=None) -> dict` with keys ``decision``
  (allow / deny / rewrite), ``rule``, ``reason``, ``sql`` (exactly what would be sent
  upstream; None when denied), plus ``hint``, ``sqlstate``, ``agent_type`` and
  ``monitored``. Exit code: 0 unless ``decision == "deny"``. `explain_text()` renders
  it for humans.
* `roles_sql(policy_set, catalog=None) -> str`: SQL that gives the database the same
  limits, as defence in depth: one role per agent type with exactly the granted
  tables / columns (privileges it had before in those schemas are revoked), its timeouts and connection limit as role defaults, and read-only
  transactions for read-only types. Column-level grants need a catalog (``deny_columns``
  is "every column but these"); without one such tables are left ungranted and the
  script says so in a comment: the database then refuses more, never less. Types
  whose DELETEs guardproxy rewrites (``soft_delete``, ``capture_deleted_rows``) also get
  what the rewritten statements need: UPDATE of the soft-delete columns, SELECT of
  every column of those tables (``RETURNING t.*`` feeds the row image), and in the
  ``guardproxy`` schema USAGE, INSERT on ``deleted_rows``, USAGE on its sequence and
  EXECUTE on ``refuse_soft_deleted(timestamptz, text)``. That schema must exist first
  (``guardproxy db upgrade``); the script grants on it only if it does (a NOTICE says
  so otherwise: run the script again after the upgrade).
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
from .agent import AgentPolicy, SoftDelete, TableRule
from .checks import GUARD_SCHEMA
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
) -> dict[str, Any]:
    """What the proxy would do with `sql` from `agent_id` (see the module docstring)."""
    policy = policy_set.match(agent_id)
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
    return "\n".join(lines)


def roles_sql(policy_set: PolicySet, catalog: Catalog | None = None) -> str:
    """CREATE ROLE / GRANT / ALTER ROLE statements mirroring the policies."""
    out = [
        "-- Generated by `guardproxy roles`: database-level limits matching the policies.",
        "-- Run it as a superuser (or the owner of the tables) in the application database.",
        "-- Each role loses its table privileges in the schemas its policy names, then gets",
        "-- exactly what the policy allows.",
    ]
    if any(policy.uses_guard_schema for policy in policy_set):
        out.extend(
            [
                f"-- Soft deletes and captured deletes write to the {GUARD_SCHEMA} schema: it must",
                "-- exist first (`guardproxy db upgrade`). Grants on it are skipped with a NOTICE",
                "-- while it does not; run this script again after the upgrade.",
            ]
        )
    for policy in policy_set:
        out.append("")
        out.extend(_role(policy, catalog))
    return "\n".join(out) + "\n"


def _role(policy: AgentPolicy, catalog: Catalog | None) -> list[str]:
    role = quote_ident(policy.upstream_role)
    lines = [
        f"-- {policy.name} ({policy.source.name}): agents {', '.join(policy.agents)}",
        "DO $guard$ BEGIN",
        f"    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {quote_literal(policy.upstream_role)}) THEN",
        f"        CREATE ROLE {role};",
        "    END IF;",
        "END $guard$;",
        f"ALTER ROLE {role} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
        + (
            f" CONNECTION LIMIT {policy.max_server_connections}"
            if policy.max_server_connections
            else ""
        )
        + ";",
    ]
    schemas: set[str] = set()
    grants: list[str] = []
    for rule in policy.tables:
        target, schema = _target(rule, catalog)
        if schema is not None:
            schemas.add(schema)
        grants.extend(_grants(policy, rule, target, catalog))
    for schema in sorted(schemas):
        # Start from nothing in these schemas (table-level REVOKE also drops column
        # grants), so that running the script again after a policy change is exact.
        lines.append(f"REVOKE ALL ON ALL TABLES IN SCHEMA {quote_ident(schema)} FROM {role};")
        lines.append(f"GRANT USAGE ON SCHEMA {quote_ident(schema)} TO {role};")
    lines.extend(grants)
    for name, ms in policy.timeout_limits_ms().items():
        statement = f"ALTER ROLE {role} SET {name} = '{ms}ms';"
        if name == "transaction_timeout":
            lines.append(
                f"-- PostgreSQL 17 and later (the proxy enforces it on older servers):\n-- {statement}"
            )
        else:
            lines.append(statement)
    if policy.read_only:
        lines.append(f"ALTER ROLE {role} SET default_transaction_read_only = on;")
    if policy.row_filters:
        lines.append(
            f"-- row_filters of {policy.name} are applied by the proxy; "
            "add row-level security policies for the same limit in the database."
        )
    lines.extend(_guard_schema_grants(policy))
    return lines


def _guard_schema_grants(policy: AgentPolicy) -> list[str]:
    """What the judge's rewrites of this type's DELETEs and upserts need in guardproxy's
    schema (nothing else), granted only when the schema (and each object) exists."""
    role = quote_ident(policy.upstream_role)
    schema = quote_ident(GUARD_SCHEMA)
    revoke = [
        f"    IF to_regnamespace({quote_literal(GUARD_SCHEMA)}) IS NOT NULL THEN",
        f"        REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM {role};",
        f"        REVOKE ALL ON ALL SEQUENCES IN SCHEMA {schema} FROM {role};",
        f"        REVOKE ALL ON SCHEMA {schema} FROM {role};",
        "    END IF;",
    ]
    if not policy.uses_guard_schema:
        return [
            f"-- {policy.name} has nothing to do in the {GUARD_SCHEMA} schema",
            "DO $guard$ BEGIN",
            *revoke,
            "END $guard$;",
        ]
    checks = [
        (
            f"to_regnamespace({quote_literal(GUARD_SCHEMA)})",
            f"GRANT USAGE ON SCHEMA {schema} TO {role}",
        ),
        (
            f"to_regclass({quote_literal(GUARD_SCHEMA + '.deleted_rows')})",
            f"GRANT INSERT ON {schema}.deleted_rows TO {role}",
        ),
        (
            f"to_regclass({quote_literal(GUARD_SCHEMA + '.deleted_rows_id_seq')})",
            f"GRANT USAGE ON SEQUENCE {schema}.deleted_rows_id_seq TO {role}",
        ),
        (
            f"to_regprocedure({quote_literal(GUARD_SCHEMA + '.refuse_soft_deleted(timestamptz, text)')})",
            f"GRANT EXECUTE ON FUNCTION {schema}.refuse_soft_deleted(timestamptz, text) TO {role}",
        ),
    ]
    lines = [
        f"-- {policy.name}: soft deletes / captured deletes are recorded in "
        f"{GUARD_SCHEMA}.deleted_rows",
        "DO $guard$ BEGIN",
        *revoke,
    ]
    for exists, grant in checks:
        lines.extend(
            [
                f"    IF {exists} IS NOT NULL THEN",
                f"        {grant};",
                "    ELSE",
                f"        RAISE NOTICE {quote_literal(grant + ': skipped, run `guardproxy db upgrade` first')};",
                "    END IF;",
            ]
        )
    lines.append("END $guard$;")
    return lines


def _target(rule: TableRule, catalog: Catalog | None) -> tuple[str, str | None]:
    if rule.schema is not None:
        return f"{quote_ident(rule.schema)}.{quote_ident(rule.name)}", rule.schema
    if catalog is not None and catalog.tables:
        schema, name = catalog.resolve(None, rule.name)
        return f"{quote_ident(schema)}.{quote_ident(name)}", schema
    return quote_ident(rule.name), "public"


def _grants(
    policy: AgentPolicy, rule: TableRule, target: str, catalog: Catalog | None
) -> list[str]:
    role = quote_ident(policy.upstream_role)
    columns: tuple[str, ...] | None = None
    if catalog is not None:
        schema = rule.schema
        if schema is None and catalog.tables:
            schema = catalog.resolve(None, rule.name)[0]
        if schema is not None:
            columns = catalog.columns(schema, rule.name)
    lines: list[str] = []
    for op in sorted(rule.ops):
        privilege = _GRANTS.get(op)
        if privilege is None:
            continue
        allowed = {
            Op.SELECT: rule.columns,
            Op.UPDATE: rule.update_columns,
            Op.INSERT: rule.insert_columns,
        }.get(op)
        column_level = op in (Op.SELECT, Op.UPDATE, Op.INSERT) and (
            allowed is not None or rule.deny_columns
        )
        if not column_level:
            lines.append(f"GRANT {privilege} ON {target} TO {role};")
            continue
        if allowed is not None:
            names = [c for c in (columns or sorted(allowed)) if c in allowed]
        elif columns is not None:
            names = list(columns)
        else:
            lines.append(
                f"-- {privilege} on {target}: every column except "
                f"{', '.join(sorted(rule.deny_columns))}; needs the catalog "
                "(--upstream or --schema) to list them, so nothing is granted"
            )
            continue
        names = [c for c in names if c not in rule.deny_columns]
        if names:
            cols = ", ".join(quote_ident(c) for c in names)
            lines.append(f"GRANT {privilege} ({cols}) ON {target} TO {role};")
    lines.extend(_rewrite_grants(policy, rule, target))
    return lines


def _rewrite_grants(policy: AgentPolicy, rule: TableRule, target: str) -> list[str]:
    """What the statements guardproxy writes for this type's DELETEs of the table need."""
    if Op.DELETE not in rule.ops or not (rule.soft_delete or rule.capture_deleted_rows):
        return []
    role = quote_ident(policy.upstream_role)
    lines = []
    if rule.columns is not None or rule.deny_columns:
        lines.append(
            f"-- {policy.name} deletes from {rule.key}: guardproxy records the whole row "
            "(RETURNING *), which needs SELECT on every column"
        )
        lines.append(f"GRANT SELECT ON {target} TO {role};")
    if rule.soft_delete is not None:
        cols = ", ".join(quote_ident(c) for c in rule.soft_delete.columns)
        lines.append(
            f"-- {policy.name}'s DELETEs of {rule.key} are soft deletes: UPDATEs of these columns"
        )
        lines.append(f"GRANT UPDATE ({cols}) ON {target} TO {role};")
    return lines


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
