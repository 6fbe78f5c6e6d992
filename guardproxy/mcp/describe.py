"""What one agent type may use, in words for an LLM: tool descriptions and ``describe``.

Pure: built from the type's `AgentPolicy` and, for ``describe``, from the rows of
`COLUMNS_QUERY` (run through the proxy as the agent: system catalogs are readable to
every agent) restricted to the tables the policy names. Nothing outside the policy is
listed: a table the policy does not name, or a column the agent may neither read nor
write, does not appear; the description only says that such things exist and are
refused. The policy's free-text ``description`` is for the humans who write policies
and is not shown (it may well name what the agent must not see).

* `capabilities(policy)`: one paragraph, "you may read ... ; deletes are soft ...",
  put into every tool description of the type;
* `policy_text(policy)`: the policy in words (the ``guardproxy://policy`` resource);
* `describe(policy, rows, search_path)`: the ``describe`` tool's answer;
* `catalog_of(rows, search_path)`: the `Catalog` the explain tool judges with.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

from ..analysis import Catalog, Op, StatementClass
from ..policy.agent import AgentPolicy, TableRule
from ..policy.durations import to_ms

#: Columns of the tables a policy names (``$1``: their names), with types and comments.
COLUMNS_QUERY = """\
SELECT n.nspname, c.relname, a.attname,
       (SELECT k.n FROM pg_catalog.unnest(i.indkey::pg_catalog.int2[]) WITH ORDINALITY AS k(attnum, n)
        WHERE k.attnum = a.attnum) AS pk_position,
       pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull,
       pg_catalog.col_description(c.oid, a.attnum::pg_catalog.int4),
       pg_catalog.obj_description(c.oid, 'pg_class')
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
LEFT JOIN pg_catalog.pg_index i ON i.indrelid = c.oid AND i.indisprimary
WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f')
  AND a.attnum > 0 AND NOT a.attisdropped
  AND c.relname = ANY($1::pg_catalog.text[])
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
  AND n.nspname NOT LIKE 'pg\\_temp%'
ORDER BY n.nspname, c.relname, a.attnum"""

SEARCH_PATH_QUERY = "SELECT pg_catalog.current_schemas(false)"

_CLASS_WORDS = {
    StatementClass.READ: "read (SELECT, VALUES, TABLE, EXPLAIN)",
    StatementClass.WRITE: "write (INSERT, UPDATE, DELETE, MERGE)",
    StatementClass.DDL: "change the schema (CREATE, ALTER, DROP)",
    StatementClass.ADMIN: "administer (roles, VACUUM, ANALYZE, ...)",
    StatementClass.CODE: "run DO blocks and CALL procedures",
    StatementClass.NOTIFY: "LISTEN and NOTIFY",
}
_OP_WORDS = {
    Op.SELECT: "read",
    Op.INSERT: "insert into",
    Op.UPDATE: "update",
    Op.DELETE: "delete from",
    Op.TRUNCATE: "truncate",
    Op.REFERENCES: "reference",
    Op.DDL: "alter",
    Op.MAINTAIN: "maintain",
}


def table_names(policy: AgentPolicy) -> list[str]:
    """The relation names `COLUMNS_QUERY` needs for this policy."""
    return sorted({rule.name for rule in policy.tables})


def catalog_of(rows: Iterable[Sequence[Any]], search_path: Sequence[str]) -> Catalog:
    return Catalog.from_rows(((r[0], r[1], r[2], r[3]) for r in rows), search_path=search_path)


def _duration(value: timedelta) -> str:
    ms = to_ms(value)
    for unit, size in (("h", 3_600_000), ("min", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def _ops(rule: TableRule) -> list[Op]:
    order = list(_OP_WORDS)
    return sorted(rule.ops, key=lambda op: order.index(op) if op in order else len(order))


def _table_clause(rule: TableRule) -> str:
    parts = []
    for op in _ops(rule):
        words = f"{_OP_WORDS.get(op, op.value)} {rule.key}"
        if op is Op.UPDATE and rule.update_columns is not None:
            words += f" (only {', '.join(sorted(rule.update_columns))})"
        if op is Op.DELETE and rule.soft_delete is not None:
            words += " (deletes are soft: rows are marked deleted, recorded, and can be undone)"
        elif op is Op.DELETE and rule.capture_deleted_rows:
            words += " (deleted rows are recorded and can be restored)"
        if op is Op.INSERT and rule.append_only:
            words += " (append-only: its rows are never updated or deleted)"
        if op is Op.SELECT and (rule.deny_columns or rule.columns is not None):
            words += " (some columns only: name them, SELECT * is refused)"
        parts.append(words)
    return "; ".join(parts)


def capabilities(policy: AgentPolicy) -> str:
    """One paragraph for the tool descriptions: what this agent type may do."""
    text = f"You are agent type {policy.name}. You may " + "; ".join(
        _table_clause(rule) for rule in policy.tables
    )
    text += ". No other table is available."
    if policy.read_only:
        text += " You are read-only: every write is refused."
    if policy.max_rows_returned is not None:
        text += f" A read returns at most {policy.max_rows_returned} rows."
    if policy.idempotency_mode == "derived":
        text += (
            " A write retried with the same task, step, statement and parameters runs once;"
            " the retry gets the first answer."
        )
    elif policy.idempotency_mode == "explicit":
        text += " A write with an idempotency_key runs once; a retry gets the first answer."
    if policy.monitor:
        text += " (The policy is in monitor mode: refusals are logged, not enforced.)"
    return text


def _functions(policy: AgentPolicy) -> str:
    rules = policy.functions
    if rules.default == "deny":
        text = "built-in functions (pg_catalog), except those with side effects"
    else:
        text = "any function, except those with side effects"
    text += (
        " (server files, large objects, other sessions, sequences such as nextval,"
        " sleeping, advisory locks, notifications, SQL held in strings, other servers,"
        " statistics resets)"
    )
    if rules.allow:
        text += f"; also: {', '.join(rules.allow)}"
    if rules.deny:
        text += f"; never: {', '.join(rules.deny)}"
    return text


def _limits(policy: AgentPolicy) -> dict[str, Any]:
    doc = policy.document
    out: dict[str, Any] = {}
    for key, value in doc.timeouts.model_dump(exclude_none=True).items():
        out[key] = _duration(value)
    limits = doc.limits.model_dump(exclude_none=True)
    limits.pop("max_server_connections", None)
    if policy.max_rows_returned is None:
        limits.pop("on_rows_returned_over", None)
    out.update(limits)
    out.update(doc.budgets.model_dump(exclude_none=True))
    if policy.idempotency_mode != "off":
        out["idempotency"] = (
            f"{policy.idempotency_mode}, keys kept {_duration(policy.idempotency_ttl)}"
        )
    return out


def _refused(policy: AgentPolicy) -> list[str]:
    out = [
        "any table, view, sequence or function not listed here",
        "columns of the listed tables that are not listed",
        "guardproxy's own schema",
    ]
    if policy.read_only:
        out.append("every write: INSERT, UPDATE, DELETE, MERGE, TRUNCATE, DDL")
    if policy.require_where:
        out.append("UPDATE or DELETE without a WHERE clause that names a column")
    if not policy.allow_locking:
        out.append("row locks (FOR UPDATE / FOR SHARE) and LOCK TABLE")
    out.append("SET ROLE, SET SESSION AUTHORIZATION, search_path and raising the timeouts")
    if policy.denied_settings:
        out.append("SET of " + ", ".join(sorted(policy.denied_settings)))
    return out


def _rules(policy: AgentPolicy, rule: TableRule) -> list[str]:
    notes = []
    if rule.soft_delete is not None and Op.DELETE in rule.ops:
        notes.append(
            f"DELETE marks rows deleted ({rule.soft_delete.deleted_at} set) instead of"
            " removing them, records each row, and you no longer see them; the reason is"
            " the call's reason"
        )
    elif rule.soft_delete is not None:
        notes.append("rows deleted by other agents are hidden from you")
    if rule.append_only:
        notes.append("append-only: INSERT only, rows are never updated or deleted")
    cap, _ = policy.cap_for(rule)
    if cap is not None and rule.ops & {Op.INSERT, Op.UPDATE, Op.DELETE}:
        notes.append(f"a statement changing more than {cap} rows is rolled back")
    for filtered, row_filter in policy.row_filters:
        if filtered is rule:
            notes.append(
                f"you see and change only rows where {row_filter.source}"
                " ({principals}, {task}, {step} come from the task tool)"
            )
    if rule.deny_columns or rule.columns is not None:
        notes.append("name the columns you read: SELECT * and whole-row references are refused")
    return notes


def _column(rule: TableRule, row: Sequence[Any]) -> dict[str, Any] | None:
    name = row[2]
    if name in rule.deny_columns:
        return None
    read = rule.columns is None or name in rule.columns
    write = []
    if Op.UPDATE in rule.ops and (rule.update_columns is None or name in rule.update_columns):
        write.append("update")
    if Op.INSERT in rule.ops and (rule.insert_columns is None or name in rule.insert_columns):
        write.append("insert")
    if rule.soft_delete is not None and name in rule.soft_delete.columns:
        write = []  # only guardproxy's rewrite of DELETE sets them
    if not read and not write:
        return None
    out: dict[str, Any] = {"name": name, "type": row[4]}
    if row[3] is not None:
        out["primary_key"] = True
    if row[5]:
        out["not_null"] = True
    if row[6]:
        out["comment"] = row[6]
    out["read"] = read
    if write:
        out["write"] = write
    return out


def describe(
    policy: AgentPolicy, agent_id: str, rows: Sequence[Sequence[Any]], search_path: Sequence[str]
) -> dict[str, Any]:
    """The describe tool's answer (see the module docstring)."""
    catalog = catalog_of(rows, search_path)
    by_key = {(r[0], r[1]): r for r in rows}
    resolved = policy.resolved_tables(catalog)
    tables = []
    for (schema, name), rule in resolved.items():
        table_rows = [r for r in rows if (r[0], r[1]) == (schema, name)]
        entry: dict[str, Any] = {"table": rule.key, "schema": schema}
        first = by_key.get((schema, name))
        if first is not None and first[7]:
            entry["comment"] = first[7]
        entry["you_may"] = _table_clause(rule)
        if table_rows:
            entry["columns"] = [c for r in table_rows if (c := _column(rule, r)) is not None]
        else:
            entry["columns"] = "unknown: the database has no such table (yet)"
        notes = _rules(policy, rule)
        if notes:
            entry["rules"] = notes
        tables.append(entry)
    return {
        "agent": agent_id,
        "agent_type": policy.name,
        "statements": [_CLASS_WORDS[c] for c in sorted(policy.statements) if c in _CLASS_WORDS]
        + ["transaction control and SET / SHOW are always allowed"],
        "tables": tables,
        "functions": _functions(policy),
        "limits": _limits(policy),
        "refused": _refused(policy),
    }


def policy_text(policy: AgentPolicy) -> str:
    """The policy in words, without the database: the ``guardproxy://policy`` resource."""
    lines = [f"# Agent type {policy.name}", "", capabilities(policy), "", "## Tables"]
    for rule in policy.tables:
        lines.append(f"- {rule.key}: {_table_clause(rule)}")
        lines += [f"  - {note}" for note in _rules(policy, rule)]
    lines += ["", "## Functions", _functions(policy), "", "## Limits"]
    lines += [f"- {key}: {value}" for key, value in _limits(policy).items()]
    lines += ["", "## Refused"]
    lines += [f"- {item}" for item in _refused(policy)]
    return "\n".join(lines) + "\n"
