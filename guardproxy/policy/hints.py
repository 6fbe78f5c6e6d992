"""Hints computed from what the policy allows: a denial never suggests a forbidden statement.

An agent reads a denial's HINT as "do this instead", so a hint that proposes
``INSERT ... ON CONFLICT`` to an agent that may not insert, or ``UPDATE`` on an
append-only table, sends it into a second denial (or, worse, teaches it that the
policy is inconsistent). Every hint that names a statement form is built here from
the agent's table rule and statement classes:

* `table_forms(policy, rule)`: the statement forms the agent may use on a table
  (``SELECT ... FROM t``, ``INSERT INTO t (...) VALUES (...)``, the upsert forms
  its operations allow, ``UPDATE t SET <its update columns> WHERE ...``,
  ``DELETE FROM t WHERE ...`` with what a soft delete does), minus those the table's
  write safety refuses (append-only: no UPDATE / DELETE / DO UPDATE);
* `forms_hint(policy, rule, exclude)`: a sentence listing them, or saying that the
  agent may do nothing else with the table;
* `where_example(policy, rule, catalog)`: a ``WHERE`` example naming a column the
  agent may read (the primary key when it is readable);
* `statement_kinds(policy)`: the plain statements the agent may run at all;
  `write_kinds(policy)`: the write statements, each only if some table allows it.

Pure: no catalog lookups beyond the `Catalog` passed in.
"""

from __future__ import annotations

from ..analysis.catalog import Catalog
from ..analysis.model import Op, StatementClass
from .agent import AgentPolicy, TableRule


def _allows(policy: AgentPolicy, rule: TableRule, op: Op) -> bool:
    needed = StatementClass.READ if op is Op.SELECT else StatementClass.WRITE
    return op in rule.ops and needed in policy.statements


def table_forms(policy: AgentPolicy, rule: TableRule) -> list[tuple[str, str]]:
    """(kind, form) pairs: the statements the agent may run on the table, by kind
    (``select``, ``insert``, ``upsert-nothing``, ``upsert-update``, ``update``,
    ``delete``)."""
    t = rule.key
    forms: list[tuple[str, str]] = []
    if _allows(policy, rule, Op.SELECT):
        forms.append(("select", f"SELECT ... FROM {t}"))
    if _allows(policy, rule, Op.INSERT):
        forms.append(("insert", f"INSERT INTO {t} (...) VALUES (...)"))
        forms.append(("upsert-nothing", f"INSERT INTO {t} ... ON CONFLICT DO NOTHING"))
        if _allows(policy, rule, Op.UPDATE) and not rule.append_only:
            forms.append(("upsert-update", f"INSERT INTO {t} ... ON CONFLICT (...) DO UPDATE"))
    if _allows(policy, rule, Op.UPDATE) and not rule.append_only:
        columns = sorted(rule.update_columns - rule.deny_columns) if rule.update_columns else []
        target = ", ".join(f"{c} = ..." for c in columns) if columns else "..."
        forms.append(("update", f"UPDATE {t} SET {target} WHERE ..."))
    if _allows(policy, rule, Op.DELETE) and not rule.append_only:
        kept = " (it keeps the rows, marked deleted)" if rule.soft_delete is not None else ""
        forms.append(("delete", f"DELETE FROM {t} WHERE ...{kept}"))
    return forms


def forms_hint(policy: AgentPolicy, rule: TableRule, exclude: frozenset[str] = frozenset()) -> str:
    """ "on t, agent may use: ..." listing `table_forms` except the kinds in `exclude`."""
    forms = [form for kind, form in table_forms(policy, rule) if kind not in exclude]
    if not forms:
        return f"{policy.name} may do nothing else with {rule.key}"
    return f"on {rule.key} {policy.name} may use: " + "; ".join(forms)


def may(policy: AgentPolicy, rule: TableRule, kind: str) -> bool:
    """Does `table_forms` offer a statement of this kind?"""
    return any(k == kind for k, _ in table_forms(policy, rule))


def readable_column(policy: AgentPolicy, rule: TableRule, catalog: Catalog) -> str | None:
    """A column of the table the agent may read: its primary key's first, if readable."""
    relation = catalog.resolve(rule.schema, rule.name)
    columns = catalog.columns(*relation)
    if columns is None:
        allowed = sorted((rule.columns or frozenset({"id"})) - rule.deny_columns)
        return allowed[0] if allowed else None
    readable = rule.readable(columns)
    key = catalog.primary_key(*relation) or ()
    for column in (*key, *readable):
        if column in readable:
            return column
    return None


def where_example(policy: AgentPolicy, rule: TableRule, catalog: Catalog) -> str:
    column = readable_column(policy, rule, catalog)
    return f"WHERE {column} = ..." if column is not None else "WHERE <a column you may read> = ..."


def statement_kinds(policy: AgentPolicy) -> str:
    """The plain statements the agent may run: ``SELECT / INSERT / UPDATE / DELETE``."""
    kinds: list[str] = []
    ops = {op for rule in policy.tables for op in rule.ops}
    if StatementClass.READ in policy.statements:
        kinds.append("SELECT")
    if StatementClass.WRITE in policy.statements:
        kinds.extend(
            verb
            for op, verb in ((Op.INSERT, "INSERT"), (Op.UPDATE, "UPDATE"), (Op.DELETE, "DELETE"))
            if op in ops
        )
    return " / ".join(kinds) if kinds else "transaction control and SET"


def write_kinds(policy: AgentPolicy) -> str:
    """The write statements some table of the policy allows: ``INSERT, UPDATE, ...``."""
    rules = policy.tables
    kinds: list[str] = []
    if any(Op.INSERT in r.ops for r in rules):
        kinds.append("INSERT")
    if any(Op.UPDATE in r.ops and not r.append_only for r in rules):
        kinds.append("UPDATE")
    if any(Op.DELETE in r.ops and not r.append_only for r in rules):
        kinds.append("DELETE")
    # MERGE is refused on soft-delete and append-only tables (guardproxy/policy/writes.py)
    if any(
        r.ops & {Op.INSERT, Op.UPDATE, Op.DELETE} and not (r.append_only or r.soft_delete)
        for r in rules
    ):
        kinds.append("MERGE")
    if any(Op.TRUNCATE in r.ops and r.soft_delete is None for r in rules):
        kinds.append("TRUNCATE")
    if any(Op.INSERT in r.ops for r in rules):
        kinds.append("COPY FROM")
    return ", ".join(kinds) or "none on the tables of the policy"
