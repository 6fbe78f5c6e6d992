"""The rules of one policy applied to one analyzed statement (no settings, no EXECUTE).

`check_statement()` returns the first `Violation` found, or None. Order matters only
for which reason the agent reads first; every rule is always applied. Each violation
says, in words an LLM can act on, which agent type may not do what to which object
under which rule (``analytics may not read customers.email (policy analytics,
tables.customers.deny_columns)``), and its hint says what *is* allowed.

Rules, in order:

1. the analyzer understood the statement (unknown statement / node types: deny);
2. statement classes: each operation's class, then the statement's own classes;
2b. every column reference resolved to a column, an output name or a FROM item
   (``unresolved``: deny, fail closed);
3. relations: nothing in guardproxy's own schema (functions neither); listed in
   ``tables`` with the operation (append-only tables: no UPDATE, DELETE, TRUNCATE,
   upsert DO UPDATE, first); system catalogs readable
   except the sensitive ones; columns read / updated / inserted allowed and not
   denied (``*`` and whole-row references count as every column); WHERE present on
   UPDATE / DELETE when ``require_where``; LOCK only with ``allow_locking``;
4. functions: ``functions.deny``, then ``functions.allow``, then the side-effect list,
   then ``functions.default`` (``t.f``, which may be a column f or the call f(t), only
   meets the rules that deny f by name);
5. row locking clauses (FOR UPDATE / SHARE ...) only with ``allow_locking``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..analysis.catalog import SYSTEM_SCHEMAS, Catalog
from ..analysis.model import (
    ALWAYS_ALLOWED_CLASSES,
    FunctionRef,
    Op,
    RelationAccess,
    StatementClass,
    StatementInfo,
)
from ..analysis.pg_builtins import BUILTIN_FUNCTIONS
from .agent import AgentPolicy, TableRule, key_path
from .checks import GUARD_SCHEMA, OP_CLASS
from .decision import SQLSTATE_FEATURE_NOT_SUPPORTED, SQLSTATE_INSUFFICIENT_PRIVILEGE
from .hints import forms_hint, may, statement_kinds, where_example, write_kinds
from .sensitive import SENSITIVE_CATALOGS
from .side_effects import side_effect

_VERBS = {
    Op.SELECT: "read",
    Op.INSERT: "insert into",
    Op.UPDATE: "update",
    Op.DELETE: "delete from",
    Op.TRUNCATE: "truncate",
    Op.LOCK: "lock",
    Op.CREATE: "create",
    Op.DDL: "alter or drop",
    Op.REFERENCES: "reference",
    Op.MAINTAIN: "run maintenance on",
}
_CLASS_WORDS = {
    StatementClass.READ: "read statements",
    StatementClass.WRITE: "write statements (INSERT, UPDATE, DELETE, MERGE, TRUNCATE, COPY FROM)",
    StatementClass.DDL: "DDL statements (CREATE, ALTER, DROP, SELECT INTO)",
    StatementClass.ADMIN: "admin statements (roles, grants, maintenance, server-side COPY)",
    StatementClass.CODE: "DO blocks and CALL",
    StatementClass.NOTIFY: "LISTEN and NOTIFY",
}


@dataclass(frozen=True, slots=True)
class Violation:
    rule: str
    reason: str
    hint: str
    sqlstate: str = SQLSTATE_INSUFFICIENT_PRIVILEGE


def _because(policy: AgentPolicy, rule: str) -> str:
    return f"(policy {policy.name}, {rule})"


def allowed_classes_hint(policy: AgentPolicy) -> str:
    classes = [c for c in StatementClass if c in policy.statements and c in _CLASS_WORDS]
    words = dict(_CLASS_WORDS)
    if StatementClass.WRITE in classes:
        words[StatementClass.WRITE] = f"write statements ({write_kinds(policy)})"
    listed = ", ".join(words[c] for c in classes) or "no data statements"
    return (
        f"{policy.name} may run: {listed}; plus transaction control, SET / SHOW, "
        "cursors and prepared statements"
    )


def tables_hint(policy: AgentPolicy) -> str:
    if not policy.tables:
        return f"{policy.name} may not use any table"
    parts = [f"{t.key} ({', '.join(sorted(o.value for o in t.ops))})" for t in policy.tables]
    return f"{policy.name} may use: " + "; ".join(parts)


def check_statement(policy: AgentPolicy, info: StatementInfo, catalog: Catalog) -> Violation | None:
    if info.unsupported:
        return Violation(
            rule="unsupported",
            reason=f"{policy.name} may not run this statement: {info.unsupported[0]} "
            f"{_because(policy, 'fail closed')}",
            hint=f"rewrite the statement with plain {statement_kinds(policy)} syntax",
            sqlstate=SQLSTATE_FEATURE_NOT_SUPPORTED,
        )
    return (
        _check_classes(policy, info)
        or _check_unresolved(policy, info)
        or _check_relations(policy, info, catalog)
        or _check_functions(policy, info)
        or _check_locking(policy, info)
    )


def _check_unresolved(policy: AgentPolicy, info: StatementInfo) -> Violation | None:
    """A column reference the analysis could not trace to a column: fail closed."""
    if not info.unresolved:
        return None
    return Violation(
        rule="unresolved",
        reason=f"{policy.name} may not run this statement: guardproxy refuses column references "
        f"it cannot trace to a table column (fail closed); here {info.unresolved[0]} "
        f"{_because(policy, 'unresolved')}",
        hint="qualify each column with a table or alias of the FROM clause (alias.column); "
        + tables_hint(policy),
    )


def _check_classes(policy: AgentPolicy, info: StatementInfo) -> Violation | None:
    for access in info.relations:
        needed = OP_CLASS.get(access.op)
        if needed is not None and needed not in policy.statements:
            return Violation(
                rule="statements",
                reason=f"{policy.name} may not {_VERBS[access.op]} {access.written}: "
                f"{_CLASS_WORDS[needed].split(' (')[0]} are not allowed {_because(policy, 'statements')}",
                hint=allowed_classes_hint(policy),
            )
    missing = sorted(info.classes - ALWAYS_ALLOWED_CLASSES - policy.statements)
    if missing:
        words = _CLASS_WORDS.get(missing[0], missing[0].value).split(" (")[0]
        names = list(dict.fromkeys(r.written for r in info.relations))
        target = f" on {', '.join(names[:3])}" if names else ""
        return Violation(
            rule="statements",
            reason=f"{policy.name} may not run {info.command}{target}: {words} are not allowed "
            f"{_because(policy, 'statements')}",
            hint=allowed_classes_hint(policy),
        )
    return None


def _check_relations(
    policy: AgentPolicy, info: StatementInfo, catalog: Catalog
) -> Violation | None:
    for access in info.relations:
        violation = _check_relation(policy, access, catalog)
        if violation is not None:
            return violation
    return None


def _guard_schema(policy: AgentPolicy, what: str) -> Violation:
    return Violation(
        rule="guardproxy_schema",
        reason=f"{policy.name} may not use {what}: the {GUARD_SCHEMA} schema is guardproxy's "
        f"own (audit log, ledgers, deleted rows) {_because(policy, 'guardproxy_schema')}",
        hint="ask an operator: `guardproxy audit ...` shows what agents did",
    )


def _check_relation(
    policy: AgentPolicy, access: RelationAccess, catalog: Catalog
) -> Violation | None:
    if access.schema == GUARD_SCHEMA:
        return _guard_schema(policy, access.written)
    rule = policy.table_rule(access.schema, access.name, catalog)
    verb = _VERBS[access.op]
    if rule is None:
        if access.op is Op.CREATE:
            return None  # a new object; the ddl class was checked already
        if access.schema in SYSTEM_SCHEMAS and access.op is Op.SELECT:
            why = SENSITIVE_CATALOGS.get(access.name) if access.schema == "pg_catalog" else None
            if why is None:
                return None  # introspection
            return Violation(
                rule="catalogs",
                reason=f"{policy.name} may not read {access.written}: it holds {why} "
                f"{_because(policy, 'sensitive catalogs')}",
                hint="other pg_catalog and information_schema relations are readable "
                "(e.g. pg_roles instead of pg_authid, pg_settings instead of pg_file_settings)",
            )
        return Violation(
            rule="tables",
            reason=f"{policy.name} may not {verb} {access.written}: the table is not in the "
            f"policy {_because(policy, 'tables')}",
            hint=tables_hint(policy),
        )
    where = key_path("tables", rule.key)
    if access.op is Op.LOCK:
        if policy.allow_locking:
            return None
        return Violation(
            rule="allow_locking",
            reason=f"{policy.name} may not lock {access.written} {_because(policy, 'allow_locking')}",
            hint="do without LOCK TABLE; locks held while an agent thinks block other sessions",
        )
    if access.op is Op.CREATE:
        return None
    if rule.append_only and access.op in (Op.UPDATE, Op.DELETE, Op.TRUNCATE):
        return append_only_violation(policy, rule, verb)
    if access.op not in rule.ops:
        return Violation(
            rule=f"{where}.ops",
            reason=f"{policy.name} may not {verb} {access.written} {_because(policy, where + '.ops')}",
            hint=f"on {rule.key} {policy.name} may: {', '.join(sorted(o.value for o in rule.ops))}",
        )
    if access.op is Op.SELECT:
        return _check_read_columns(policy, access, rule, catalog)
    if access.op in (Op.UPDATE, Op.INSERT):
        violation = _check_written_columns(policy, access, rule)
        if violation is not None:
            return violation
    if access.op in (Op.UPDATE, Op.DELETE) and policy.require_where and not access.has_where:
        return Violation(
            rule="require_where",
            reason=f"{policy.name} may not {verb} {access.written} without a WHERE clause that "
            f"names a column {_because(policy, 'require_where')}",
            hint=f"add a WHERE clause selecting the rows to {access.op.value}, e.g. "
            f"{where_example(policy, rule, catalog)}",
        )
    return None


def append_only_violation(policy: AgentPolicy, rule: TableRule, verb: str) -> Violation:
    """UPDATE, DELETE, TRUNCATE, MERGE or an upsert's DO UPDATE of an append-only table."""
    where = f"{key_path('tables', rule.key)}.append_only"
    if may(policy, rule, "insert"):
        hint = (
            f"insert a new row into {rule.key} instead (for a correction, a row that records "
            f"it): INSERT INTO {rule.key} (...) VALUES (...); ON CONFLICT DO NOTHING is fine too"
        )
    else:
        hint = forms_hint(policy, rule)
    return Violation(
        rule=where,
        reason=f"{policy.name} may not {verb} {rule.key}: it is append-only, its rows are never "
        f"changed nor deleted {_because(policy, where)}",
        hint=hint,
    )


def _column_list(rule: TableRule, catalog: Catalog, schema: str, name: str) -> str:
    columns = catalog.columns(schema, name)
    if columns is not None:
        readable = rule.readable(columns)
        return ", ".join(f"{rule.key}.{c}" for c in readable) or "no column"
    if rule.columns is not None:
        return ", ".join(f"{rule.key}.{c}" for c in sorted(rule.columns - rule.deny_columns))
    return f"any column of {rule.key} except {', '.join(sorted(rule.deny_columns))}"


def _check_read_columns(
    policy: AgentPolicy, access: RelationAccess, rule: TableRule, catalog: Catalog
) -> Violation | None:
    where = key_path("tables", rule.key)
    readable = _column_list(rule, catalog, access.schema, access.name)
    if access.all_columns:
        if rule.deny_columns:
            denied = ", ".join(sorted(rule.deny_columns))
            return Violation(
                rule=f"{where}.deny_columns",
                reason=f"{policy.name} may not read every column of {access.written} "
                f"(* or a whole-row reference includes {denied}) "
                f"{_because(policy, where + '.deny_columns')}",
                hint=f"name the columns instead; {policy.name} may read {readable}",
            )
        if rule.columns is not None:
            known = catalog.columns(access.schema, access.name)
            if known is None or not set(known) <= rule.columns:
                return Violation(
                    rule=f"{where}.columns",
                    reason=f"{policy.name} may not read every column of {access.written} "
                    f"(* or a whole-row reference) {_because(policy, where + '.columns')}",
                    hint=f"name the columns instead; {policy.name} may read {readable}",
                )
    for column in sorted(access.columns):
        if column in rule.deny_columns:
            return Violation(
                rule=f"{where}.deny_columns",
                reason=f"{policy.name} may not read {rule.key}.{column} "
                f"{_because(policy, where + '.deny_columns')}",
                hint=f"{policy.name} may read {readable}",
            )
        if rule.columns is not None and column not in rule.columns:
            return Violation(
                rule=f"{where}.columns",
                reason=f"{policy.name} may not read {rule.key}.{column} "
                f"{_because(policy, where + '.columns')}",
                hint=f"{policy.name} may read {readable}",
            )
    return None


def _check_written_columns(
    policy: AgentPolicy, access: RelationAccess, rule: TableRule
) -> Violation | None:
    where = key_path("tables", rule.key)
    is_update = access.op is Op.UPDATE
    allowed = rule.update_columns if is_update else rule.insert_columns
    field = "update_columns" if is_update else "insert_columns"
    verb = "update" if is_update else "insert into"
    listed = (
        ", ".join(f"{rule.key}.{c}" for c in sorted(allowed - rule.deny_columns))
        if allowed is not None
        else f"any column of {rule.key}"
        + (f" except {', '.join(sorted(rule.deny_columns))}" if rule.deny_columns else "")
    )
    if access.all_columns and (allowed is not None or rule.deny_columns):
        return Violation(
            rule=f"{where}.{field}",
            reason=f"{policy.name} may not {verb} {access.written} without a column list "
            f"{_because(policy, where + '.' + field)}",
            hint=f"list the columns explicitly; {policy.name} may {verb.split()[0]} {listed}",
        )
    for column in sorted(access.columns):
        if column in rule.deny_columns:
            return Violation(
                rule=f"{where}.deny_columns",
                reason=f"{policy.name} may not {verb.split()[0]} {rule.key}.{column} "
                f"{_because(policy, where + '.deny_columns')}",
                hint=f"{policy.name} may {verb.split()[0]} {listed}",
            )
        if allowed is not None and column not in allowed:
            return Violation(
                rule=f"{where}.{field}",
                reason=f"{policy.name} may not {verb.split()[0]} {rule.key}.{column} "
                f"{_because(policy, where + '.' + field)}",
                hint=f"{policy.name} may {verb.split()[0]} only {listed}",
            )
    return None


def is_builtin(fn: FunctionRef) -> bool:
    if fn.schema == "information_schema":
        return True
    return fn.schema in (None, "pg_catalog") and fn.name in BUILTIN_FUNCTIONS


def function_violation(
    policy: AgentPolicy, fn: FunctionRef, by_name_only: bool = False
) -> Violation | None:
    """The rule a call breaks. `by_name_only`: `t.f` that may be a column or the call
    f(t): only the rules that deny f by name apply (deny list, side effects)."""
    rules = policy.functions
    name = fn.name
    shown = f"{fn.qualified}()"
    if fn.schema == GUARD_SCHEMA:
        return _guard_schema(policy, shown)
    if any(fnmatchcase(name, pattern) for pattern in rules.deny):
        return Violation(
            rule="functions.deny",
            reason=f"{policy.name} may not call {shown} {_because(policy, 'functions.deny')}",
            hint=f"functions denied to {policy.name}: {', '.join(rules.deny)}",
        )
    if any(fnmatchcase(name, pattern) for pattern in rules.allow):
        return None
    why = side_effect(name)
    if why is not None:
        return Violation(
            rule="functions",
            reason=f"{policy.name} may not call {shown}: it {why} "
            f"{_because(policy, 'functions: side effects')}",
            hint=("built-in functions" if rules.default == "deny" else "functions")
            + " without side effects are allowed"
            + (f"; explicitly allowed: {', '.join(rules.allow)}" if rules.allow else ""),
        )
    if rules.default == "deny" and not is_builtin(fn) and not by_name_only:
        return Violation(
            rule="functions.default",
            reason=f"{policy.name} may not call {shown}: only built-in functions and "
            f"functions.allow are allowed {_because(policy, 'functions.default')}",
            hint="use built-in functions"
            + (f" or: {', '.join(rules.allow)}" if rules.allow else ""),
        )
    return None


def _check_functions(policy: AgentPolicy, info: StatementInfo) -> Violation | None:
    for fn in info.functions:
        violation = function_violation(policy, fn)
        if violation is not None:
            return violation
    for fn in info.possible_calls:
        violation = function_violation(policy, fn, by_name_only=True)
        if violation is not None:
            return violation
    return None


def _check_locking(policy: AgentPolicy, info: StatementInfo) -> Violation | None:
    if info.locking and not policy.allow_locking:
        return Violation(
            rule="allow_locking",
            reason=f"{policy.name} may not use {info.locking[0]} {_because(policy, 'allow_locking')}",
            hint="remove the locking clause; row and table locks held while an agent thinks "
            "block other sessions",
        )
    return None
