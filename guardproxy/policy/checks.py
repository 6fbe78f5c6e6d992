"""Checks across the keys of one policy file, and compilation into an `AgentPolicy`.

pydantic checks each value on its own; these checks catch policies that are valid
YAML of the right types but cannot mean what their author wanted:

* a table name or column name that is not a SQL name, or two keys for one table;
* an operation whose statement class the policy does not allow (``ops: [delete]``
  without ``write`` in ``statements`` would silently never work);
* ``update_columns`` without ``update`` (same for insert), a column both allowed and
  denied;
* a function both allowed and denied;
* a row filter on a table the policy does not list, or a predicate that does not
  compile; a per-operation condition (``update``, ``delete``, ``insert``) for an
  operation the table's ``ops`` do not include;
* write safety that contradicts itself: an append-only table with update / delete /
  truncate in its ops, soft delete together with append-only or with
  capture_deleted_rows, soft-delete columns the agent may write, capture, a row
  cap or ``soft_deleted_parents: allow`` on a table the agent never writes, a table
  in guardproxy's own schema.

Every problem is reported with its key path; the policy is compiled only if none.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..analysis.model import Op, StatementClass
from .agent import AgentPolicy, FunctionRules, SoftDelete, TableRule, key_path
from .models import PolicyDocument, RowFilterOpsDocument, TableDocument
from .names import parse_table_key
from .rowfilter import RowFilter, compile_row_filter

Problem = tuple[str, str]  # (key path, message)

#: guardproxy's own schema in the upstream database (audit log, ledgers, deleted rows).
GUARD_SCHEMA = "guardproxy"

#: The statement class each table operation needs.
OP_CLASS: dict[Op, StatementClass] = {
    Op.SELECT: StatementClass.READ,
    Op.INSERT: StatementClass.WRITE,
    Op.UPDATE: StatementClass.WRITE,
    Op.DELETE: StatementClass.WRITE,
    Op.TRUNCATE: StatementClass.WRITE,
    Op.DDL: StatementClass.DDL,
    Op.REFERENCES: StatementClass.DDL,
    Op.MAINTAIN: StatementClass.ADMIN,
}


def compile_policy(
    name: str, source: Path, doc: PolicyDocument
) -> tuple[AgentPolicy | None, list[Problem]]:
    problems: list[Problem] = []
    statements = frozenset(StatementClass(s) for s in doc.statements)
    tables = _tables(doc, statements, problems)
    functions = _functions(doc, problems)
    row_filters = _row_filters(doc, tables, problems, name)
    if problems:
        return None, problems
    policy = AgentPolicy(
        name=name,
        source=source,
        document=doc,
        agents=tuple(doc.agents),
        upstream_role=doc.upstream_role,
        mode=doc.mode,
        statements=statements,
        tables=tuple(tables.values()),
        functions=functions,
        require_where=doc.require_where,
        allow_locking=doc.allow_locking,
        denied_settings=frozenset(doc.settings.deny),
        row_filters=tuple(row_filters),
        description=doc.description,
    )
    return policy, []


def _tables(
    doc: PolicyDocument, statements: frozenset[StatementClass], problems: list[Problem]
) -> dict[tuple[str | None, str], TableRule]:
    tables: dict[tuple[str | None, str], TableRule] = {}
    for key, table in doc.tables.items():
        try:
            schema, tname, pattern = parse_table_key(key)
        except ValueError as exc:
            problems.append((key_path("tables", key), str(exc)))
            continue
        if (schema, tname) in tables:
            other = tables[(schema, tname)].key
            problems.append((key_path("tables", key), f"names the same table as tables.{other}"))
            continue
        ops = frozenset(Op(o) for o in table.ops)
        for op in sorted(ops):
            needed = OP_CLASS[op]
            if needed not in statements:
                problems.append(
                    (
                        key_path("tables", key, "ops"),
                        f"'{op.value}' needs '{needed.value}' in statements "
                        f"(statements: {', '.join(doc.statements)})",
                    )
                )
        deny = frozenset(table.deny_columns)
        for field, op, cols in (
            ("update_columns", Op.UPDATE, table.update_columns),
            ("insert_columns", Op.INSERT, table.insert_columns),
        ):
            if cols is not None and op not in ops:
                problems.append(
                    (
                        key_path("tables", key, field),
                        f"is set but ops does not include '{op.value}'",
                    )
                )
        for field, cols in (
            ("columns", table.columns),
            ("update_columns", table.update_columns),
            ("insert_columns", table.insert_columns),
        ):
            both = sorted(set(cols or ()) & deny)
            if both:
                problems.append(
                    (key_path("tables", key, field), f"{', '.join(both)} also in deny_columns")
                )
        _write_safety(key, table, ops, schema, problems)
        soft = table.soft_delete
        tables[(schema, tname)] = TableRule(
            key=key,
            schema=schema,
            name=tname,
            ops=ops,
            columns=frozenset(table.columns) if table.columns is not None else None,
            update_columns=frozenset(table.update_columns)
            if table.update_columns is not None
            else None,
            insert_columns=frozenset(table.insert_columns)
            if table.insert_columns is not None
            else None,
            deny_columns=deny,
            soft_delete=SoftDelete(soft.deleted_at, soft.deleted_by, soft.reason)
            if soft is not None
            else None,
            append_only=table.append_only,
            capture_deleted_rows=table.capture_deleted_rows,
            max_rows_affected=table.max_rows_affected,
            pattern=pattern,
            refuse_deleted_parents=table.soft_deleted_parents == "refuse",
        )
    return tables


_CHANGES = frozenset({Op.UPDATE, Op.DELETE, Op.TRUNCATE})
_WRITES = frozenset({Op.INSERT, Op.UPDATE, Op.DELETE, Op.TRUNCATE})


def _write_safety(
    key: str, table: TableDocument, ops: frozenset[Op], schema: str | None, problems: list[Problem]
) -> None:
    if schema == GUARD_SCHEMA:
        problems.append(
            (
                key_path("tables", key),
                f"the {GUARD_SCHEMA} schema is guardproxy's own (audit log, ledgers): "
                "agents may not use it",
            )
        )
    if table.append_only:
        changing = sorted(o.value for o in ops & _CHANGES)
        if changing:
            problems.append(
                (
                    key_path("tables", key, "ops"),
                    f"{', '.join(changing)} on an append_only table: remove "
                    f"{'it' if len(changing) == 1 else 'them'} from ops (append-only tables "
                    "take only inserts)",
                )
            )
    soft = table.soft_delete
    if soft is not None:
        if table.append_only:
            problems.append(
                (
                    key_path("tables", key, "soft_delete"),
                    "an append_only table is never deleted from: remove soft_delete",
                )
            )
        if table.capture_deleted_rows:
            problems.append(
                (
                    key_path("tables", key, "capture_deleted_rows"),
                    "is for tables without soft_delete (a soft delete keeps the row already)",
                )
            )
        marks = {soft.deleted_at, soft.deleted_by, soft.reason}
        for field, cols in (
            ("update_columns", table.update_columns),
            ("insert_columns", table.insert_columns),
        ):
            both = [c for c in cols or () if c in marks]
            if both:
                problems.append(
                    (
                        key_path("tables", key, field),
                        f"{', '.join(both)}: only guardproxy writes the soft-delete columns",
                    )
                )
    if table.capture_deleted_rows and Op.DELETE not in ops:
        problems.append(
            (
                key_path("tables", key, "capture_deleted_rows"),
                "is set but ops does not include 'delete'",
            )
        )
    if table.soft_deleted_parents == "allow" and not ops & {Op.INSERT, Op.UPDATE}:
        problems.append(
            (
                key_path("tables", key, "soft_deleted_parents"),
                "is set but ops includes neither 'insert' nor 'update' (it is about the rows "
                "the agent writes into this table)",
            )
        )
    if table.max_rows_affected is not None and not ops & _WRITES:
        problems.append(
            (
                key_path("tables", key, "max_rows_affected"),
                "is set but ops includes no write (insert, update, delete, truncate)",
            )
        )


def _functions(doc: PolicyDocument, problems: list[Problem]) -> FunctionRules:
    both = sorted(set(doc.functions.allow) & set(doc.functions.deny))
    if both:
        problems.append(
            (key_path("functions", "allow"), f"{', '.join(both)} also in functions.deny")
        )
    return FunctionRules(
        default=doc.functions.default,
        allow=tuple(doc.functions.allow),
        deny=tuple(doc.functions.deny),
    )


def _row_filters(
    doc: PolicyDocument,
    tables: dict[tuple[str | None, str], TableRule],
    problems: list[Problem],
    policy_name: str = "",
) -> list[tuple[TableRule, RowFilter]]:
    out: list[tuple[TableRule, RowFilter]] = []
    for key, text in doc.row_filters.items():
        path = key_path("row_filters", key)
        try:
            schema, tname, _ = parse_table_key(key)
        except ValueError as exc:
            problems.append((path, str(exc)))
            continue
        rule = tables.get((schema, tname))
        if rule is None:
            problems.append((path, f"{key} is not in tables: list it there with its operations"))
            continue
        if isinstance(text, str):
            try:
                out.append((rule, compile_row_filter(rule.key, text)))
            except ValueError as exc:
                problems.append((path, str(exc)))
            continue
        compiled = compile_operation_filters(rule, text, policy_name, path, problems)
        if compiled is not None:
            out.append((rule, compiled))
    return out


def compile_operation_filters(
    rule: TableRule,
    doc: RowFilterOpsDocument,
    policy_name: str,
    path: str,
    problems: list[Problem],
) -> RowFilter | None:
    """``row_filters.<t>: {select, update, delete, insert}`` compiled into one `RowFilter`
    whose variants UPDATE, DELETE and INSERT use (see `RowFilter.for_role`): an UPDATE
    or DELETE changes only rows the ``select`` condition shows *and* its own condition
    allows; ``insert`` is checked on every new row."""
    before = len(problems)
    for op in ("update", "delete", "insert"):
        if getattr(doc, op) is not None and Op(op) not in rule.ops:
            problems.append(
                (f"{path}.{op}", f"is set but tables.{rule.key}.ops does not include '{op}'")
            )

    def compiled(op: str, text: str | None, with_select: bool) -> RowFilter | None:
        if text is None:
            return None
        if with_select and doc.select is not None:
            text = f"({doc.select}) AND ({text})"
        try:
            return compile_row_filter(rule.key, text)
        except ValueError as exc:
            problems.append((f"{path}.{op}", str(exc)))
            return None

    select = compiled("select", doc.select, False)
    update = compiled("update", doc.update, True)
    delete = compiled("delete", doc.delete, True)
    insert = compiled("insert", doc.insert, False)
    if len(problems) > before:
        return None
    where = f"policy {policy_name}, {path}.insert"
    check = (
        None
        if insert is None
        else replace(
            insert,
            denial=(
                f"{policy_name} may not insert this row into {rule.key}: it does not pass the "
                f"insert condition of its row filter ({where})",
                f"{policy_name} may insert into {rule.key} only rows for which this holds: "
                f"{doc.insert}",
            ),
        )
    )
    base = select or RowFilter(rule.key, "", "true", (), reads=False)
    return replace(base, update=update, delete=delete, insert=check)
