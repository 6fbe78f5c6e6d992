"""Write safety in the judge: append-only tables, soft deletes, captured deletes, row caps.

Pure: it reads one analyzed statement (its tree and where each relation sits) and the
policy, and says what the statement may not do, what it writes (`WriteEffects`), and
how its tree must be rewritten. The engine calls, per statement of a message:

* `analyze_writes(policy, catalog, statement, executed)` -> `WriteAnalysis`: the first
  violation (None when there is none), the effects for the runtime, and the DELETEs
  and upserts to rewrite;
* `rewrite_writes(analysis, context, catalog)` after the row-filter pass (which adds
  ``AND t.deleted_at IS NULL`` to every read, UPDATE and DELETE of a soft-delete
  table), to turn each DELETE of a soft-delete or capture table into the
  writable-CTE form and to guard ``ON CONFLICT DO UPDATE`` on soft-delete tables.

Rules, in order, for every table the statement writes:

1. ``append_only``: MERGE is denied (rule ``tables.<t>.append_only``; UPDATE, DELETE,
   TRUNCATE and ``ON CONFLICT DO UPDATE`` were denied with the relations, in
   `rules`): insert a new row instead.
2. ``soft_delete``: TRUNCATE and MERGE are denied; UPDATE, the DO UPDATE of an
   upsert, INSERT and COPY FROM may not write the soft-delete columns (and INSERT /
   COPY must list their columns); a DELETE must be one guardproxy can rewrite (the
   root statement, a WITH query of it, the statement of PREPARE, EXPLAIN or COPY) and its
   RETURNING may name only the deleted table's columns. A table the catalog knows
   without the soft-delete columns is refused outright (rule
   ``tables.<t>.soft_delete``).
3. ``capture_deleted_rows``: the same conditions on DELETE.
4. Foreign keys to soft-deleted parents (`parents`): each value written into a key
   column whose parent table is soft-deleted is checked by Postgres in the same
   statement, unless ``tables.<t>.soft_deleted_parents: allow``.
5. Row counting: when a row cap (``tables.<t>.max_rows_affected`` or
   ``limits.max_rows_affected``) or ``budgets.max_writes_per_task`` applies, a write
   whose rows the statement's CommandComplete does not count is denied: a write in a
   WITH query under another statement, EXPLAIN ANALYZE of a write, TRUNCATE.

The rewritten DELETE (``DELETE FROM t [USING u] WHERE w [RETURNING r]``, soft delete)::

    WITH <agent's CTEs>,
    guardproxy_deleted AS (
      UPDATE t SET deleted_at = now(), deleted_by = '<agent id>', delete_reason = '<reason>'
      [FROM u] WHERE w AND t.deleted_at IS NULL RETURNING t.*),
    guardproxy_logged AS (
      INSERT INTO guardproxy.deleted_rows (agent_id, task, step, reason, table_name,
                                          primary_key, row_image)
      SELECT '<agent id>', '<task>', '<step>', '<reason>', 'public.t',
             jsonb_build_object('<pk>', guardproxy_deleted.<pk>, ...),
             to_jsonb(guardproxy_deleted)
      FROM guardproxy_deleted)
    SELECT r FROM guardproxy_deleted AS t          -- or: SELECT FROM guardproxy_deleted

With ``capture_deleted_rows`` the first CTE is the DELETE itself, ``RETURNING t.*``.
Context values (agent id, task, step, the ``reason`` tag) are string constants in the
tree, printed by pglast; NULL when absent. A DELETE in a WITH query keeps its CTE
name: the two CTEs are inserted before it and its body becomes the SELECT.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

from pglast import ast
from pglast.enums import (
    BoolExprType,
    CTEMaterialize,
    OnConflictAction,
    OverridingKind,
    SetOperation,
)
from pglast.visitors import Ancestor, Skip

from ..analysis.analyzer import AnalyzedStatement
from ..analysis.catalog import Catalog
from ..analysis.collector import RelationRecord, strings
from ..analysis.model import Op
from ..analysis.scope import written_name
from ..analysis.visiting import FastVisitor
from .agent import AgentPolicy, SoftDelete, TableRule, key_path
from .checks import GUARD_SCHEMA
from .decision import SQLSTATE_FEATURE_NOT_SUPPORTED, Decision, WriteEffects
from .hints import forms_hint, may, readable_column
from .names import quote_ident
from .parents import ParentEdit, plan_parent_checks
from .rowfilter import RewriteError, RowFilter, compile_row_filter, conjuncts
from .rules import Violation, append_only_violation

DELETED_ROWS = "deleted_rows"
REFUSE_SOFT_DELETED = "refuse_soft_deleted"
_DML = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)
_JSONB_BUILD_MAX_COLUMNS = 50  # jsonb_build_object takes at most 100 arguments


def soft_delete_alternatives(agent_type: str, rule: TableRule) -> str:
    """What an agent may do instead of TRUNCATE / MERGE on a soft-delete table: only the
    statements its policy allows on the table."""
    ways = []
    if Op.DELETE in rule.ops:
        ways.append(f"DELETE FROM {rule.key} WHERE ... (it keeps the rows, marked deleted)")
    if Op.UPDATE in rule.ops:
        ways.append(f"UPDATE {rule.key} ... WHERE ...")
    if Op.INSERT in rule.ops:
        upsert = "ON CONFLICT" if Op.UPDATE in rule.ops else "ON CONFLICT DO NOTHING"
        ways.append(f"INSERT INTO {rule.key} ... [{upsert}]")
    if not ways:
        return f"on {rule.key} {agent_type} may: {', '.join(sorted(o.value for o in rule.ops))}"
    return "use " + ", ".join(ways[:-1]) + (" or " if len(ways) > 1 else "") + ways[-1]


def qualified_name(relation: tuple[str, str]) -> str:
    """``schema.table`` with each part quoted when it needs it (valid regclass input)."""
    return f"{quote_ident(relation[0])}.{quote_ident(relation[1])}"


def soft_delete_filter(rule: TableRule, row_filter: RowFilter | None) -> RowFilter | None:
    """The row filter of a table for reads and writes: the policy's own, AND
    ``deleted_at IS NULL`` for a soft-delete table."""
    soft = rule.soft_delete
    if soft is None:
        return row_filter
    live = f"{quote_ident(soft.deleted_at)} IS NULL"
    if row_filter is None:
        return compile_row_filter(rule.key, live)
    if not row_filter.reads:  # only per-operation conditions: reads see the live rows
        return replace(
            row_filter,
            source=live,
            template=live,
            placeholders=(),
            reads=True,
            update=_and_live(row_filter.update, live),
            delete=_and_live(row_filter.delete, live),
        )
    base = _and_live(row_filter, live)
    assert base is not None
    return replace(
        base,
        update=_and_live(row_filter.update, live),
        delete=_and_live(row_filter.delete, live),
    )


def _and_live(row_filter: RowFilter | None, live: str) -> RowFilter | None:
    if row_filter is None or live in conjuncts(row_filter.template):
        return row_filter  # the policy's filter says it already
    return replace(
        row_filter,
        source=f"({row_filter.source}) AND {live}",
        template=f"({row_filter.template}) AND {live}",
    )


# -- where a write sits in its statement ---------------------------------------------


@dataclass(frozen=True, slots=True)
class _Place:
    """Where a DML node sits: the holder's attribute that points at it."""

    kind: str  # root, prepared, explain, copy, cte, nested
    holder: ast.Node | None = None
    attr: str = ""
    with_clause: ast.WithClause | None = None  # for kind "cte": the list it is in


_NESTED = _Place("nested")


def _places(raw: ast.RawStmt) -> tuple[dict[int, _Place], ast.Node | None, str]:
    """The place of every DML node guardproxy can rewrite, the main query, its kind."""
    top = raw.stmt
    holder: ast.Node = raw
    attr, kind = "stmt", "root"
    if isinstance(top, ast.PrepareStmt):
        holder, attr, kind = top, "query", "prepared"
    elif isinstance(top, ast.ExplainStmt):
        holder, attr, kind = top, "query", "explain"
    elif isinstance(top, ast.CopyStmt):
        holder, attr, kind = top, "query", "copy"
    elif isinstance(top, ast.DeclareCursorStmt | ast.CreateTableAsStmt):
        holder, attr, kind = top, "query", "nested"
    main = getattr(holder, attr, None)
    places: dict[int, _Place] = {}
    if isinstance(top, ast.CopyStmt) and top.is_from:
        places[id(top)] = _Place("root", raw, "stmt")  # COPY n counts its rows
    if isinstance(main, _DML):
        places[id(main)] = _Place(kind, holder, attr)
    with_clause = getattr(main, "withClause", None)
    if isinstance(with_clause, ast.WithClause):
        for cte in with_clause.ctes or ():
            if isinstance(cte, ast.CommonTableExpr) and isinstance(cte.ctequery, _DML):
                places[id(cte.ctequery)] = _Place("cte", cte, "ctequery", with_clause)
    return places, main if isinstance(main, ast.Node) else None, kind


# -- analysis ----------------------------------------------------------------------


@dataclass(slots=True)
class _Write:
    record: RelationRecord
    rule: TableRule | None
    op: str  # insert, update, delete, merge, truncate, copy
    place: _Place
    qualified: str


@dataclass
class WriteAnalysis:
    """What `analyze_writes` found in one statement."""

    statement: AnalyzedStatement
    violation: Violation | None = None
    effects: WriteEffects | None = None
    deletes: list[_Write] = field(default_factory=list)  # to rewrite (soft or captured)
    upserts: list[_Write] = field(default_factory=list)  # ON CONFLICT DO UPDATE to guard
    parents: list[ParentEdit] = field(default_factory=list)  # key values to check
    parent_rule: str = ""  # tables.<t>.soft_deleted_parents of the first

    @property
    def rewrites(self) -> bool:
        return bool(self.deletes or self.upserts or self.parents)

    @property
    def rule(self) -> str:
        """The policy rule of the first rewrite, for the decision."""
        for write in (*self.deletes, *self.upserts):
            if write.rule is not None:
                what = (
                    "soft_delete" if write.rule.soft_delete is not None else "capture_deleted_rows"
                )
                return f"{key_path('tables', write.rule.key)}.{what}"
        return self.parent_rule


def _op(record: RelationRecord) -> str | None:
    role = record.role
    if role in ("insert", "update", "delete", "merge", "truncate"):
        return role
    if role == "copy" and isinstance(record.owner, ast.CopyStmt) and record.owner.is_from:
        return "copy"
    return None


def _target_names(targets: tuple[ast.Node, ...] | None) -> list[str]:
    return [t.name for t in targets or () if isinstance(t, ast.ResTarget) and t.name]


def _returning(stmt: ast.Node) -> tuple[ast.Node, ...]:
    clause = getattr(stmt, "returningClause", None)
    if isinstance(clause, ast.ReturningClause):
        return tuple(clause.exprs or ())
    return ()


def _refname(rv: ast.RangeVar) -> str:
    """How the statement refers to its target: the alias, else the table name."""
    return (rv.alias.aliasname if rv.alias is not None else rv.relname) or ""


def _is_upsert_update(stmt: ast.Node) -> bool:
    conflict = getattr(stmt, "onConflictClause", None)
    return (
        isinstance(conflict, ast.OnConflictClause)
        and conflict.action == OnConflictAction.ONCONFLICT_UPDATE
    )


class _Analyzer:
    def __init__(self, policy: AgentPolicy, catalog: Catalog, statement: AnalyzedStatement) -> None:
        self.policy = policy
        self.catalog = catalog
        self.statement = statement
        self.name = policy.name

    def because(self, rule: str) -> str:
        return f"(policy {self.name}, {rule})"

    def run(self, executed: Decision | None) -> WriteAnalysis:
        result = WriteAnalysis(self.statement)
        places, main, kind = _places(self.statement.raw)
        rules = self.policy.resolved_tables(self.catalog)
        writes: list[_Write] = []
        for record in self.statement.records:
            rule = rules.get(record.relation)
            if rule is not None and rule.soft_delete is not None:
                problem = self._missing_columns(rule, record.relation)
                if problem is not None:
                    result.violation = problem
                    return result
            op = _op(record)
            if op is None:
                continue
            place = places.get(id(record.owner), _NESTED)
            writes.append(_Write(record, rule, op, place, qualified_name(record.relation)))
        for write in writes:
            problem = self._check(write, kind)
            if problem is not None:
                result.violation = problem
                return result
            if write.rule is None:
                continue
            if write.op in ("insert", "update", "merge", "copy"):
                problem, edits = plan_parent_checks(
                    self.policy, self.catalog, write.record, write.op
                )
                if problem is not None:
                    result.violation = problem
                    return result
                if edits and not result.parents:
                    result.parent_rule = (
                        f"{key_path('tables', write.rule.key)}.soft_deleted_parents"
                    )
                result.parents.extend(edits)
            managed = write.rule.soft_delete is not None or write.rule.capture_deleted_rows
            if write.op == "delete" and managed:
                result.deletes.append(write)
            elif (
                write.op == "insert"
                and write.rule.soft_delete is not None
                and _is_upsert_update(write.record.owner)
            ):
                result.upserts.append(write)
        effects = self._effects(writes, main, kind, result.deletes)
        if executed is not None:
            problem, effects = self._executed(executed, effects)
            if problem is not None:
                result.violation = problem
                return result
        result.effects = effects
        return result

    # -- rules -------------------------------------------------------------------

    def _missing_columns(self, rule: TableRule, relation: tuple[str, str]) -> Violation | None:
        soft = rule.soft_delete
        columns = self.catalog.columns(*relation)
        if soft is None or columns is None:
            return None
        missing = [c for c in soft.columns if c not in columns]
        if not missing:
            return None
        where = f"{key_path('tables', rule.key)}.soft_delete"
        return Violation(
            rule=where,
            reason=f"{self.name} may not use {rule.key}: its policy soft-deletes rows, but the "
            f"table has no column {', '.join(missing)} {self.because(where)}",
            hint=f"an operator adds them: `guardproxy soft-delete sql {rule.key}` prints the "
            "ALTER TABLE",
            sqlstate=SQLSTATE_FEATURE_NOT_SUPPORTED,
        )

    def _check(self, write: _Write, kind: str) -> Violation | None:
        rule = write.rule
        if rule is not None:
            problem = (
                self._append_only(write, rule)
                or self._soft_delete(write, rule)
                or self._deletes(write, rule)
            )
            if problem is not None:
                return problem
        return self._counted(write, rule, kind)

    def _append_only(self, write: _Write, rule: TableRule) -> Violation | None:
        # UPDATE, DELETE, TRUNCATE and DO UPDATE were refused with the relations already;
        # what is left is a MERGE that only inserts.
        if not rule.append_only or write.op != "merge":
            return None
        return append_only_violation(self.policy, rule, "MERGE into")

    def _soft_delete(self, write: _Write, rule: TableRule) -> Violation | None:
        soft = rule.soft_delete
        if soft is None:
            return None
        where = f"{key_path('tables', rule.key)}.soft_delete"
        owner = write.record.owner
        marks = soft.columns
        if write.op in ("truncate", "merge"):
            verb = "TRUNCATE" if write.op == "truncate" else "MERGE into"
            writes = forms_hint(self.policy, rule, frozenset({"select"}))
            return Violation(
                rule=where,
                reason=f"{self.name} may not {verb} {rule.key}: its rows are soft-deleted, and "
                f"{verb.split()[0]} would change or remove them for good {self.because(where)}",
                hint=writes if "may use" in writes else forms_hint(self.policy, rule),
            )
        written: list[str] = []
        all_columns = False
        if write.op == "update" and isinstance(owner, ast.UpdateStmt):
            written = _target_names(owner.targetList)
        elif write.op == "insert" and isinstance(owner, ast.InsertStmt):
            written = _target_names(owner.cols)
            all_columns = not written
            conflict = owner.onConflictClause
            if isinstance(conflict, ast.OnConflictClause):
                written += _target_names(conflict.targetList)
        elif write.op == "copy" and isinstance(owner, ast.CopyStmt):
            written = strings(owner.attlist)
            all_columns = not written
        touched = [c for c in marks if c in written]
        if touched or all_columns:
            what = (
                f"set {', '.join(f'{rule.key}.{c}' for c in touched)}"
                if touched
                else f"insert into {rule.key} without a column list"
            )
            return Violation(
                rule=where,
                reason=f"{self.name} may not {what}: only guardproxy writes the soft-delete "
                f"columns {', '.join(marks)} {self.because(where)}",
                hint=(
                    f"to delete rows use DELETE FROM {rule.key} WHERE ...; "
                    if may(self.policy, rule, "delete")
                    else ""
                )
                + f"list the columns explicitly, without {', '.join(marks)}",
            )
        return None

    def _deletes(self, write: _Write, rule: TableRule) -> Violation | None:
        if write.op != "delete":
            return None
        if rule.soft_delete is not None:
            where, what = f"{key_path('tables', rule.key)}.soft_delete", "soft-deletes"
        elif rule.capture_deleted_rows:
            where, what = f"{key_path('tables', rule.key)}.capture_deleted_rows", "records"
        else:
            return None
        owner = write.record.owner
        if write.place.kind not in ("root", "prepared", "explain", "copy", "cte"):
            return Violation(
                rule=where,
                reason=f"{self.name} may not delete from {rule.key} here: guardproxy {what} the "
                f"rows of a DELETE only when it is a statement of its own or a WITH query "
                f"{self.because(where)}",
                hint=f"run DELETE FROM {rule.key} WHERE ... [RETURNING ...] as a statement",
                sqlstate=SQLSTATE_FEATURE_NOT_SUPPORTED,
            )
        assert isinstance(owner, ast.DeleteStmt) and owner.relation is not None
        rv = owner.relation
        ref = _refname(rv)
        problem = _ReturningCheck.find(owner, ref, self.catalog.columns(*write.record.relation))
        if problem is None:
            return None
        return Violation(
            rule=where,
            reason=f"{self.name} may not use this RETURNING on {rule.key}: {problem} (guardproxy "
            f"{what} the deleted rows, and RETURNING reads them from there) {self.because(where)}",
            hint=f"return columns of {rule.key} only (RETURNING "
            f"{ref}.{readable_column(self.policy, rule, self.catalog) or '<column>'}, ...)",
            sqlstate=SQLSTATE_FEATURE_NOT_SUPPORTED,
        )

    def _counted(self, write: _Write, rule: TableRule | None, kind: str) -> Violation | None:
        cap, cap_rule = self.policy.cap_for(rule)
        budget = self.policy.max_writes_per_task
        if cap is None and budget is None:
            return None
        place = write.place.kind
        info = self.statement.info
        if kind == "explain" and not info.explain_analyze:
            return None  # plain EXPLAIN does not run it
        if write.op == "truncate":
            why = "TRUNCATE does not say how many rows it removes"
        elif place == "explain":
            why = "EXPLAIN ANALYZE runs the write without saying how many rows it changed"
        elif place in ("root", "prepared", "copy"):
            return None
        elif place == "cte":
            why = "a write in a WITH query is not counted by the statement's row count"
        else:
            why = "guardproxy cannot count the rows of a write in this position"
        if cap is not None:
            limit, what = cap_rule, f"max_rows_affected = {cap}"
        else:
            limit, what = "budgets.max_writes_per_task", f"max_writes_per_task = {budget}"
        verb = {"delete": "delete from", "insert": "insert into", "merge": "MERGE into"}.get(
            write.op, write.op
        )
        return Violation(
            rule=limit,
            reason=f"{self.name} may not {verb} {written_name(write.record.node)} this way: {why}, "
            f"so {what} cannot be enforced {self.because(limit)}",
            hint="run the write as a statement of its own (RETURNING gives its rows to the next "
            "statement)",
        )

    # -- effects -----------------------------------------------------------------

    def _effects(
        self, writes: list[_Write], main: ast.Node | None, kind: str, deletes: list[_Write]
    ) -> WriteEffects | None:
        info = self.statement.info
        if not writes or kind == "prepared":
            return None
        if kind == "explain" and not info.explain_analyze:
            return None
        tables = tuple(dict.fromkeys(w.qualified for w in writes))
        root = next((w for w in writes if w.record.owner is main), None)
        operation = (root or writes[0]).op
        counted = [w for w in writes if w.place.kind in ("root", "copy")]
        caps = [(c, r) for c, r in (self.policy.cap_for(w.rule) for w in counted) if c is not None]
        cap, cap_rule = min(caps, key=lambda pair: pair[0]) if caps else (None, "")
        rewritten = next(
            (w for w in deletes if w.place.kind == "root" and w.record.owner is main), None
        )
        soft = (
            rewritten is not None
            and rewritten.rule is not None
            and bool(rewritten.rule.soft_delete)
        )
        return WriteEffects(
            operation=operation,
            tables=tables,
            soft_delete=soft,
            soft_delete_returning=rewritten is not None
            and bool(_returning(rewritten.record.owner)),
            max_rows_affected=cap,
            cap_rule=cap_rule,
            captured=rewritten is not None and not soft,
        )

    def _executed(
        self, inner: Decision, effects: WriteEffects | None
    ) -> tuple[Violation | None, WriteEffects | None]:
        """EXECUTE of a prepared write: the effects of the statement it runs."""
        write = inner.write
        info = self.statement.info
        if write is None or (info.command == "EXPLAIN"):
            return None, effects
        if info.command == "EXECUTE":
            return None, write
        if write.max_rows_affected is not None or self.policy.max_writes_per_task is not None:
            limit = (
                write.cap_rule
                if write.max_rows_affected is not None
                else "budgets.max_writes_per_task"
            )
            return Violation(
                rule=limit,
                reason=f"{self.name} may not run {info.command} of a prepared write on "
                f"{', '.join(write.tables)}: its rows would not be counted "
                f"{self.because(limit)}",
                hint="EXECUTE the prepared statement on its own",
            ), effects
        return None, replace(write, soft_delete=False, soft_delete_returning=False, captured=False)


class _ReturningCheck(FastVisitor):
    """Columns of a DELETE's RETURNING that the rewrite could not return."""

    def __init__(self, ref: str, columns: tuple[str, ...] | None, using: bool) -> None:
        super().__init__()
        self.ref = ref
        self.columns = columns
        self.using = using
        self.problem: str | None = None

    @classmethod
    def find(cls, stmt: ast.DeleteStmt, ref: str, columns: tuple[str, ...] | None) -> str | None:
        clause = stmt.returningClause
        if clause is None:
            return None
        if clause.options:
            return "RETURNING WITH (OLD / NEW AS ...) is not supported"
        checker = cls(ref, columns, bool(stmt.usingClause))
        for expr in clause.exprs or ():
            checker(expr)
            if checker.problem is not None:
                return checker.problem
        return None

    def visit_SubLink(self, ancestors: Ancestor, node: ast.SubLink) -> object:
        return Skip  # a subquery has its own names

    def visit_ColumnRef(self, ancestors: Ancestor, node: ast.ColumnRef) -> None:
        fields = node.fields or ()
        names = strings(fields)
        star = bool(fields) and isinstance(fields[-1], ast.A_Star)
        if star and not names:
            if self.using:
                self.problem = "RETURNING * of a DELETE ... USING includes the USING tables"
            return
        if len(names) >= 2 or (star and names):
            if names[0] != self.ref:
                self.problem = f"{'.'.join(names)} is not a column of {self.ref}"
            return
        name = names[0] if names else ""
        if self.columns is not None and name not in self.columns and name != self.ref:
            self.problem = f"{name} is not a column of {self.ref}"


def analyze_writes(
    policy: AgentPolicy,
    catalog: Catalog,
    statement: AnalyzedStatement,
    executed: Decision | None = None,
) -> WriteAnalysis:
    """Check the writes of one statement and describe them (see the module docstring).

    `executed`: for ``EXECUTE name``, the decision on the prepared statement.
    """
    return _Analyzer(policy, catalog, statement).run(executed)


# -- rewriting ---------------------------------------------------------------------


def _const(value: str | None) -> ast.A_Const:
    if value is None:
        return ast.A_Const(isnull=True)
    if "\x00" in value:
        raise RewriteError("a context value contains a NUL character")
    return ast.A_Const(isnull=False, val=ast.String(sval=value))


def _column(*names: str) -> ast.ColumnRef:
    return ast.ColumnRef(fields=tuple(ast.String(sval=n) for n in names))


def _star(ref: str) -> ast.ResTarget:
    return ast.ResTarget(val=ast.ColumnRef(fields=(ast.String(sval=ref), ast.A_Star())))


def _call(*name: str, args: tuple[ast.Node, ...] = ()) -> ast.FuncCall:
    return ast.FuncCall(funcname=tuple(ast.String(sval=n) for n in name), args=args or None)


def _range(name: str, schema: str | None = None, alias: str | None = None) -> ast.RangeVar:
    return ast.RangeVar(
        schemaname=schema,
        relname=name,
        inh=True,
        relpersistence="p",
        alias=ast.Alias(aliasname=alias) if alias is not None else None,
    )


def _and(left: ast.Node | None, right: ast.Node) -> ast.Node:
    if left is None:
        return right
    return ast.BoolExpr(boolop=BoolExprType.AND_EXPR, args=(left, right))


@dataclass(frozen=True)
class DeleteContext:
    """Who deletes, for which task and step, and why (the ``reason`` tag)."""

    agent_id: str
    task: str | None = None
    step: str | None = None
    reason: str | None = None

    @classmethod
    def of(
        cls, agent_id: str, task: str | None, step: str | None, tags: Mapping[str, str]
    ) -> DeleteContext:
        return cls(agent_id=agent_id, task=task, step=step, reason=tags.get("reason") or None)


def _names(taken: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    used = set(taken)
    number = 1
    while True:
        suffix = "" if number == 1 else f"_{number}"
        deleted, logged = f"guardproxy_deleted{suffix}", f"guardproxy_logged{suffix}"
        if deleted not in used and logged not in used:
            yield deleted, logged
        number += 1


def rewrite_writes(analysis: WriteAnalysis, context: DeleteContext, catalog: Catalog) -> None:
    """Rewrite the statement's tree in place (after the row-filter pass)."""
    for edit in analysis.parents:
        edit.apply()
    for upsert in analysis.upserts:
        _guard_upsert(upsert)
    names = _names(analysis.statement.info.ctes)
    for delete in analysis.deletes:
        _rewrite_delete(delete, context, catalog, next(names))


def _guard_upsert(write: _Write) -> None:
    insert = write.record.owner
    assert isinstance(insert, ast.InsertStmt) and insert.relation is not None
    assert write.rule is not None and write.rule.soft_delete is not None
    conflict = insert.onConflictClause
    assert isinstance(conflict, ast.OnConflictClause)
    rv = insert.relation
    ref = _refname(rv)
    check = _call(
        GUARD_SCHEMA,
        REFUSE_SOFT_DELETED,
        args=(_column(ref, write.rule.soft_delete.deleted_at), _const(write.qualified)),
    )
    conflict.whereClause = _and(conflict.whereClause, check)


def _key_expression(deleted: str, relation: tuple[str, str], catalog: Catalog) -> ast.Node:
    columns = catalog.primary_key(*relation) or catalog.columns(*relation)
    if not columns or len(columns) > _JSONB_BUILD_MAX_COLUMNS:
        return _call("to_jsonb", args=(_column(deleted),))
    args: list[ast.Node] = []
    for column in columns:
        args.extend((_const(column), _column(deleted, column)))
    return _call("jsonb_build_object", args=tuple(args))


def _log_insert(
    deleted: str, write: _Write, context: DeleteContext, catalog: Catalog
) -> ast.InsertStmt:
    values: tuple[ast.Node, ...] = (
        _const(context.agent_id),
        _const(context.task),
        _const(context.step),
        _const(context.reason),
        _const(write.qualified),
        _key_expression(deleted, write.record.relation, catalog),
        _call("to_jsonb", args=(_column(deleted),)),
    )
    columns = ("agent_id", "task", "step", "reason", "table_name", "primary_key", "row_image")
    return ast.InsertStmt(
        relation=_range(DELETED_ROWS, GUARD_SCHEMA),
        cols=tuple(ast.ResTarget(name=c) for c in columns),
        selectStmt=ast.SelectStmt(
            targetList=tuple(ast.ResTarget(val=v) for v in values),
            fromClause=(_range(deleted),),
            op=SetOperation.SETOP_NONE,
        ),
        override=OverridingKind.OVERRIDING_NOT_SET,
    )


def _cte(name: str, query: ast.Node) -> ast.CommonTableExpr:
    return ast.CommonTableExpr(
        ctename=name, ctequery=query, ctematerialized=CTEMaterialize.CTEMaterializeDefault
    )


def _rewrite_delete(
    write: _Write, context: DeleteContext, catalog: Catalog, names: tuple[str, str]
) -> None:
    delete = write.record.owner
    assert isinstance(delete, ast.DeleteStmt) and delete.relation is not None
    rule = write.rule
    assert rule is not None
    deleted, logged = names
    rv = delete.relation
    ref = _refname(rv)
    returning = _returning(delete)
    body: ast.Node
    soft: SoftDelete | None = rule.soft_delete
    if soft is not None:
        body = ast.UpdateStmt(
            relation=rv,
            targetList=(
                ast.ResTarget(name=soft.deleted_at, val=_call("now")),
                ast.ResTarget(name=soft.deleted_by, val=_const(context.agent_id)),
                ast.ResTarget(name=soft.reason, val=_const(context.reason)),
            ),
            whereClause=delete.whereClause,
            fromClause=delete.usingClause,
            returningClause=ast.ReturningClause(exprs=(_star(ref),)),
        )
    else:
        body = ast.DeleteStmt(
            relation=rv,
            usingClause=delete.usingClause,
            whereClause=delete.whereClause,
            returningClause=ast.ReturningClause(exprs=(_star(ref),)),
        )
    ours = (_cte(deleted, body), _cte(logged, _log_insert(deleted, write, context, catalog)))
    result = ast.SelectStmt(
        targetList=returning or None,
        fromClause=(_range(deleted, alias=ref if returning else None),),
        op=SetOperation.SETOP_NONE,
    )
    place = write.place
    if place.kind == "cte":
        # The DELETE's own WITH stays with it; the CTE keeps its name and columns.
        body.withClause = delete.withClause
        with_clause, holder = place.with_clause, place.holder
        assert with_clause is not None and isinstance(holder, ast.CommonTableExpr)
        ctes = list(with_clause.ctes or ())
        at = next(i for i, c in enumerate(ctes) if c is holder)
        with_clause.ctes = (*ctes[:at], *ours, *ctes[at:])
        holder.ctequery = result
        return
    agent = delete.withClause
    result.withClause = ast.WithClause(
        ctes=(*(agent.ctes or () if agent is not None else ()), *ours),
        recursive=bool(agent is not None and agent.recursive),
    )
    assert place.holder is not None
    setattr(place.holder, place.attr, result)
