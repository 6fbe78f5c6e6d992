"""Child rows for soft-deleted parents: refused by Postgres, value by value, in the same statement.

A soft-deleted row stays in its table, so its foreign keys still accept new children:
``INSERT INTO order_state_log (order_id, ...) VALUES (6, ...)`` succeeds for a deleted
order 6, and tells the agent that the order still exists. For every foreign key of
the table written whose parent table is soft-deleted by the agent's policy
(``tables.<parent>.soft_delete``), the judge wraps each value written into the key
column::

    INSERT INTO order_state_log (order_id, new_status, ...)
    VALUES (guardproxy.live_parent(CAST('6' AS bigint), 'public.orders', 'id', 'deleted_at',
                                   'support', 'order_state_log.order_id',
                                   'tables.order_state_log.soft_deleted_parents'), 'x', ...)

``guardproxy.live_parent`` (migration 0006) reads the parent row's ``deleted_at`` and
raises SQLSTATE 23503 (foreign key violation) naming the agent type, the column, the
value, when the parent was deleted and the rule, or returns the value unchanged.

Why this form, rather than a check before the write or a filter on the source rows:

* It is enforced by Postgres inside the agent's own statement, atomically with the
  write: there is no window between a check and the write, no second round trip,
  and the statement's answer (``INSERT 0 n``, its RETURNING rows) is unchanged.
* Only the value is wrapped, so the statement keeps its shape: ``DEFAULT``, ``ON
  CONFLICT``, ``RETURNING``, ``OVERRIDING``, writable CTEs, PREPARE and EXPLAIN
  ANALYZE work as written. A string constant, NULL or parameter is cast to the key
  column's type first (from the catalog), so that it is typed as the column would
  have typed it (a driver's parameter stays a ``bigint``).
* The lookup runs with the agent's role: it needs SELECT on the parent's key and
  soft-delete columns, which a policy that soft-deletes the parent grants already.
  A parent soft-deleted by another transaction after the statement started may be
  missed; the write then happened before the delete, as in a serial order.

``COPY ... FROM`` brings its rows from outside the statement: it gets the check as
its ``WHERE`` (``WHERE guardproxy.live_parent(k, ...) IS NOT DISTINCT FROM k``, true
for every row whose parent is live). Where the value written cannot be found, the
write is refused (rule ``tables.<t>.soft_deleted_parents``, fail closed): ``INSERT
... SELECT *`` or a set operation as source, ``SET (a, b) = (SELECT ...)`` on a key
column, and keys of several columns. ``soft_deleted_parents:
allow`` on the table written turns the check off, for schemas where children of
deleted rows are expected (e.g. a log that records the deletion itself).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import pglast
from pglast import ast
from pglast.enums import A_Expr_Kind, BoolExprType, CmdType, SetOperation

from ..analysis.catalog import Catalog, ForeignKey
from ..analysis.collector import RelationRecord, strings
from .agent import AgentPolicy, TableRule, key_path
from .checks import GUARD_SCHEMA
from .decision import SQLSTATE_FEATURE_NOT_SUPPORTED
from .names import quote_ident
from .rules import Violation

LIVE_PARENT = "live_parent"


@dataclass(frozen=True, slots=True)
class _Key:
    """A single-column foreign key of the table written, to a soft-delete parent."""

    column: str
    type: str
    parent: tuple[str, str]
    parent_column: str
    deleted_at: str


@dataclass(slots=True)
class ParentEdit:
    """One value to wrap; `apply` edits the tree in place (after the judge said yes)."""

    apply: Callable[[], None]


class _Refused(Exception):
    """The value written into a checked key cannot be found: refuse the write."""


def plan_parent_checks(
    policy: AgentPolicy, catalog: Catalog, record: RelationRecord, op: str
) -> tuple[Violation | None, list[ParentEdit]]:
    """The edits that check the parents of a write (insert, update, merge, copy), or
    why it is refused."""
    child = record.relation
    rule = policy.table_rule(*child, catalog)
    if rule is None or not rule.refuse_deleted_parents:
        return None, []
    keys, several = _keys(policy, catalog, child)
    if not keys and not several:
        return None, []
    where = f"{key_path('tables', rule.key)}.soft_deleted_parents"
    site = _Site(policy, rule, keys, where)
    try:
        written = site.visit(record, op, catalog)
    except _Refused as exc:
        return _refusal(policy, rule, where, str(exc)), []
    for fk in several:
        touched = sorted(set(fk.columns) & written)
        if touched:
            why = (
                f"{', '.join(touched)} belongs to a foreign key of several columns, "
                "which guardproxy does not check for soft-deleted parents"
            )
            return _refusal(policy, rule, where, why), []
    return None, site.edits


def _keys(
    policy: AgentPolicy, catalog: Catalog, child: tuple[str, str]
) -> tuple[list[_Key], list[ForeignKey]]:
    """Single-column keys to soft-delete parents; keys of several columns to them."""
    single: list[_Key] = []
    several: list[ForeignKey] = []
    for fk in catalog.references(*child):
        parent = policy.table_rule(*fk.parent, catalog)
        if parent is None or parent.soft_delete is None:
            continue
        if len(fk.columns) != 1:
            several.append(fk)
            continue
        single.append(
            _Key(
                column=fk.columns[0],
                type=fk.types[0] if fk.types else "",
                parent=fk.parent,
                parent_column=fk.parent_columns[0],
                deleted_at=parent.soft_delete.deleted_at,
            )
        )
    return single, several


def _refusal(policy: AgentPolicy, rule: TableRule, where: str, why: str) -> Violation:
    return Violation(
        rule=where,
        reason=f"{policy.name} may not write {rule.key} this way: {why}, so guardproxy cannot "
        f"check that the row it refers to is not soft-deleted (policy {policy.name}, {where})",
        hint=f"write the key columns of {rule.key} with INSERT ... VALUES (...), a SELECT that "
        "lists its columns, or UPDATE ... SET column = value",
        sqlstate=SQLSTATE_FEATURE_NOT_SUPPORTED,
    )


class _Site:
    """Finds the values a write puts into checked key columns, and plans their edits."""

    def __init__(self, policy: AgentPolicy, rule: TableRule, keys: list[_Key], where: str) -> None:
        self.policy = policy
        self.rule = rule
        self.keys = {k.column: k for k in keys}
        self.where = where
        self.edits: list[ParentEdit] = []

    def visit(self, record: RelationRecord, op: str, catalog: Catalog) -> set[str]:
        """Plan the edits; return every column the write sets."""
        owner = record.owner
        all_columns = catalog.columns(*record.relation) or ()
        if op == "insert" and isinstance(owner, ast.InsertStmt):
            columns = _names(owner.cols) or list(all_columns)
            self._source(owner.selectStmt, columns)
            conflict = owner.onConflictClause
            updated = self._targets(conflict.targetList if conflict is not None else None)
            return set(columns) | updated
        if op == "update" and isinstance(owner, ast.UpdateStmt):
            return self._targets(owner.targetList)
        if op == "merge" and isinstance(owner, ast.MergeStmt):
            return self._merge(owner, list(all_columns))
        if op == "copy" and isinstance(owner, ast.CopyStmt):
            copied = strings(owner.attlist) or list(all_columns)
            self._copy(owner, copied)
            return set(copied)
        return set()

    def _copy(self, copy: ast.CopyStmt, columns: list[str]) -> None:
        """COPY ... FROM: each row passes ``WHERE live_parent(k, ...) IS NOT DISTINCT FROM k``
        (true, or an error for a soft-deleted parent) before it is inserted."""
        checked = [self.keys[c] for c in columns if c in self.keys]
        if not checked:
            return

        def edit() -> None:
            for key in checked:
                column = ast.ColumnRef(fields=(ast.String(sval=key.column),))
                test = ast.A_Expr(
                    kind=A_Expr_Kind.AEXPR_NOT_DISTINCT,
                    name=(ast.String(sval="="),),
                    lexpr=self._call(column, key),
                    rexpr=ast.ColumnRef(fields=(ast.String(sval=key.column),)),
                )
                where = copy.whereClause
                copy.whereClause = (
                    test
                    if where is None
                    else ast.BoolExpr(boolop=BoolExprType.AND_EXPR, args=(where, test))
                )

        self.edits.append(ParentEdit(edit))

    def _merge(self, merge: ast.MergeStmt, all_columns: list[str]) -> set[str]:
        written: set[str] = set()
        for clause in merge.mergeWhenClauses or ():
            if not isinstance(clause, ast.MergeWhenClause):
                continue
            if clause.commandType == CmdType.CMD_UPDATE:
                written |= self._targets(clause.targetList)
            elif clause.commandType == CmdType.CMD_INSERT and clause.values is not None:
                columns = _names(clause.targetList) or all_columns
                self._values(clause, "values", columns, single=True)
                written |= set(columns)
        return written

    def _source(self, source: ast.Node | None, columns: list[str]) -> None:
        if source is None or not any(c in self.keys for c in columns):
            return  # DEFAULT VALUES, or no checked key written
        if not isinstance(source, ast.SelectStmt):
            raise _Refused("its rows come from a statement guardproxy cannot edit")
        if source.valuesLists:
            self._values(source, "valuesLists", columns, single=False)
            return
        targets = source.targetList or ()
        plain = source.op is None or source.op == SetOperation.SETOP_NONE
        if not plain or len(targets) != len(columns) or any(_is_star(t) for t in targets):
            raise _Refused("its rows come from a set operation or a SELECT with *")
        for column, target in zip(columns, targets, strict=True):
            key = self.keys.get(column)
            if key is not None and isinstance(target, ast.ResTarget) and target.val is not None:
                self._wrap_target(target, key)

    def _values(self, holder: ast.Node, attr: str, columns: list[str], single: bool) -> None:
        """Plan the edits of VALUES rows (``holder.attr``: rows, or one row if `single`)."""
        current = getattr(holder, attr)
        rows = [current] if single else list(current)
        plan = [
            (index, position, key)
            for index, row in enumerate(rows)
            for position, column in enumerate(columns[: len(row)])
            if (key := self.keys.get(column)) is not None
            and not isinstance(row[position], ast.SetToDefault)
        ]
        if not plan:
            return

        def edit() -> None:
            found = getattr(holder, attr)
            edited = [list(row) for row in ([found] if single else found)]
            for index, position, key in plan:
                edited[index][position] = self._call(edited[index][position], key)
            rebuilt = tuple(tuple(row) for row in edited)
            setattr(holder, attr, rebuilt[0] if single else rebuilt)

        self.edits.append(ParentEdit(edit))

    def _targets(self, targets: tuple[ast.Node, ...] | None) -> set[str]:
        """UPDATE / ON CONFLICT / MERGE ``SET column = value``."""
        written: set[str] = set()
        for target in targets or ():
            if not isinstance(target, ast.ResTarget) or not target.name:
                continue
            written.add(target.name)
            key = self.keys.get(target.name)
            if key is None or isinstance(target.val, ast.SetToDefault):
                continue
            if isinstance(target.val, ast.MultiAssignRef) or target.indirection:
                raise _Refused(f"{target.name} is set from a row (SET (a, b) = ...) or in part")
            self._wrap_target(target, key)
        return written

    def _wrap_target(self, target: ast.ResTarget, key: _Key) -> None:
        def edit() -> None:
            target.val = self._call(target.val, key)

        self.edits.append(ParentEdit(edit))

    def _call(self, value: ast.Node | None, key: _Key) -> ast.FuncCall:
        typed = value
        untyped = isinstance(value, ast.ParamRef) or (
            isinstance(value, ast.A_Const) and (value.isnull or isinstance(value.val, ast.String))
        )
        type_name = _type_name(key.type) if untyped and key.type else None
        if type_name is not None:
            typed = ast.TypeCast(arg=value, typeName=type_name)
        args: tuple[ast.Node, ...] = (
            typed if typed is not None else ast.A_Const(isnull=True),
            _text(f"{quote_ident(key.parent[0])}.{quote_ident(key.parent[1])}"),
            _text(key.parent_column),
            _text(key.deleted_at),
            _text(self.policy.name),
            _text(f"{self.rule.key}.{key.column}"),
            _text(self.where),
        )
        return ast.FuncCall(
            funcname=(ast.String(sval=GUARD_SCHEMA), ast.String(sval=LIVE_PARENT)), args=args
        )


def _text(value: str) -> ast.A_Const:
    return ast.A_Const(isnull=False, val=ast.String(sval=value))


def _is_star(target: ast.Node) -> bool:
    value = target.val if isinstance(target, ast.ResTarget) else None
    return isinstance(value, ast.ColumnRef) and isinstance(
        (value.fields or (None,))[-1], ast.A_Star
    )


def _names(targets: tuple[ast.Node, ...] | None) -> list[str]:
    return [t.name for t in targets or () if isinstance(t, ast.ResTarget) and t.name]


@lru_cache(maxsize=256)
def _type_name(text: str) -> ast.TypeName | None:
    """The TypeName of a format_type() text (``bigint``, ``character varying(20)``)."""
    try:
        stmt = pglast.parse_sql(f"SELECT NULL::{text}")[0].stmt
    except pglast.parser.ParseError:
        return None
    target = stmt.targetList[0] if isinstance(stmt, ast.SelectStmt) and stmt.targetList else None
    cast = target.val if isinstance(target, ast.ResTarget) else None
    return cast.typeName if isinstance(cast, ast.TypeCast) else None
