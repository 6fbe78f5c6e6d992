"""Row filters: a per-table predicate added to every read and write of that table.

A policy writes ``row_filters: {orders: "customer_id = ANY({principals})"}``. The
placeholders are filled from the session context:

=================  ================================================================
``{principals}``   the principals as an array literal (``'{"7","9"}'``), which
                   Postgres coerces to the other operand's array type; no
                   principals gives an empty array, so the filter matches nothing
``{agent_id}``     the agent id (login user name)
``{task}``         the task id, NULL when there is none (the filter then matches
``{step}``         nothing), and the step id
``{tag.NAME}``     a free-form tag of the context, NULL when absent
=================  ================================================================

Write ``{{`` and ``}}`` for literal braces. Column names in the predicate are the
filtered table's, unqualified.

Safety: a placeholder becomes a ``$n`` parameter when the policy is loaded, and the
parameter node is replaced by a string *constant node* when a statement is rewritten;
the value is never pasted into SQL text, so no value can change the predicate's
structure. The rewritten tree is printed by pglast, which quotes constants for
``standard_conforming_strings = on``: the proxy must keep that setting on upstream
(the engine denies turning it off).

Rewrite (on the tree the decision was made on):

* a read of the table in any FROM (joins, subqueries, CTEs, UPDATE ... FROM, DELETE
  ... USING, MERGE ... USING) becomes ``(SELECT cols FROM table WHERE predicate) AS
  alias``, which keeps outer joins right; `cols` are the readable columns when the
  catalog knows them (so column-level GRANTs keep working), ``*`` otherwise. The
  soft-delete filter (``deleted_at IS NULL``, `apply_row_filters(pushed=...)`) is
  added where the table is read instead whenever that means the same (to the WHERE
  of a FROM list, to the ON of an inner join or of the inner side of an outer join):
  the table keeps its name and row type (``SELECT o FROM orders o`` still returns
  ``orders`` rows);
* UPDATE and DELETE of the table get ``AND (predicate)`` in their WHERE;
* COPY table TO STDOUT becomes ``COPY (SELECT ... WHERE predicate) TO STDOUT``;
* INSERT, MERGE, TRUNCATE, COPY FROM and TABLESAMPLE on a filtered table are denied:
  there is no way to add the predicate to them; an INSERT into a table whose filter
  has an ``insert`` condition is checked row by row instead (`insertcheck`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import pglast
from pglast import ast, parser
from pglast.enums import BoolExprType, JoinType, SetOperation
from pglast.stream import RawStream
from pglast.visitors import Ancestor, Skip

from ..analysis.collector import RelationRecord, strings
from ..analysis.visiting import FastVisitor

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+)?)\}")
_FIXED = ("principals", "agent_id", "task", "step")


class RewriteError(ValueError):
    """A statement that touches a filtered table in a way the filter cannot be added to."""

    def __init__(self, message: str, table: str = "", hint: str = "") -> None:
        super().__init__(message)
        self.table = table  # the policy key of the filtered table
        self.hint = hint  # what to do instead; "" for the engine's hint of the table


@dataclass(frozen=True)
class RowFilter:
    """A compiled row filter: the predicate with placeholders turned into $1..$n.

    A filter written per operation (``row_filters.<t>: {select: ..., update: ...}``)
    is one `RowFilter` for reads with variants: `update` / `delete` replace it for an
    UPDATE / DELETE of the table (compiled as ``(select) AND (update)``), `insert`
    is the condition every inserted row must pass (`denial`: its error message and
    hint). `reads` False: reads are not filtered (no ``select`` condition).
    `for_role` picks the filter for a use of the table.
    """

    table: str  # the key as written in the policy, for messages
    source: str  # the predicate as written
    template: str  # the predicate with $n parameters
    placeholders: tuple[str, ...]  # $1 is placeholders[0], ...
    update: RowFilter | None = None
    delete: RowFilter | None = None
    insert: RowFilter | None = None
    reads: bool = True
    denial: tuple[str, str] = ("", "")

    def for_role(self, role: str) -> RowFilter | None:
        """The filter a use of the table gets (`RelationRecord.role`); None: none.
        An INSERT without an `insert` condition gets None (it cannot be filtered)."""
        if role == "insert":
            return self.insert
        if role == "update" and self.update is not None:
            return self.update
        if role == "delete" and self.delete is not None:
            return self.delete
        return self if self.reads else None

    def applies(self, record: RelationRecord) -> bool:
        """Does this use of the table get rewritten (or refused)? Reads, UPDATE and
        DELETE without a condition of their own are left alone."""
        role = record.role
        owner = record.owner
        if role in ("from", "update", "delete") or (
            role == "copy" and isinstance(owner, ast.CopyStmt) and not owner.is_from
        ):
            return self.for_role(role) is not None
        return True

    @property
    def variants(self) -> tuple[tuple[str, RowFilter], ...]:
        """(operation, filter) of every condition, ``select`` first."""
        out: list[tuple[str, RowFilter]] = [("select", self)] if self.reads else []
        for op, variant in (
            ("update", self.update),
            ("delete", self.delete),
            ("insert", self.insert),
        ):
            if variant is not None:
                out.append((op, variant))
        return tuple(out)

    @property
    def all_placeholders(self) -> frozenset[str]:
        return frozenset(name for _, f in self.variants for name in f.placeholders)

    def expression(self, values: Mapping[str, str | None]) -> ast.Node:
        """A fresh expression tree with the placeholders replaced by constants."""
        node = _parse_predicate(self.template)
        consts = [values.get(name) for name in self.placeholders]
        for value in consts:
            if value is not None and "\x00" in value:
                raise RewriteError("a context value contains a NUL character", self.table)
        filled: ast.Node = _Fill(consts)(node)  # returns the new root if it was replaced
        return filled


def compile_row_filter(table: str, text: str) -> RowFilter:
    """Check and compile a predicate; ValueError says what is wrong."""
    if re.search(r"\$\d", text):
        raise ValueError("use placeholders such as {principals}, not $n parameters")
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in _FIXED and not name.startswith("tag."):
            raise ValueError(
                f"unknown placeholder {{{name}}}: expected one of "
                "{principals}, {agent_id}, {task}, {step}, {tag.NAME} (write {{ for a brace)"
            )
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    escaped = text.replace("{{", "\x01").replace("}}", "\x02")
    template = _PLACEHOLDER.sub(number, escaped)
    if "{" in template or "}" in template:
        stray = template.replace("\x01", "{{").replace("\x02", "}}")
        raise ValueError(f"unbalanced or malformed placeholder in {stray!r}")
    template = template.replace("\x01", "{").replace("\x02", "}")
    try:
        node = _parse_predicate(template)
    except ValueError as exc:
        raise ValueError(f"not a valid SQL condition: {exc}") from None
    checker = _Checker(len(names))
    checker(node)
    if checker.problem:
        raise ValueError(checker.problem)
    return RowFilter(table=table, source=text, template=template, placeholders=tuple(names))


# SelectStmt slots that may be set in `SELECT WHERE <condition>`; any other slot set
# means the text was more than a condition (ORDER BY, LIMIT, UNION, WINDOW...).
_CONDITION_SLOTS = {"whereClause", "op", "limitOption", "all", "groupDistinct"}
_SELECT_SLOTS: tuple[str, ...] = tuple(ast.SelectStmt.__slots__)  # type: ignore[attr-defined]


def _parse_predicate(text: str) -> ast.Node:
    try:
        tree = pglast.parse_sql(f"SELECT WHERE {text}")
    except parser.ParseError as exc:
        raise ValueError(str(exc.args[0]) if exc.args else str(exc)) from None
    if len(tree) != 1:
        raise ValueError("expected one condition, found several statements")
    stmt = tree[0].stmt
    if not isinstance(stmt, ast.SelectStmt) or stmt.whereClause is None:
        raise ValueError("expected a single condition")
    if stmt.op != SetOperation.SETOP_NONE or any(
        getattr(stmt, slot) for slot in _SELECT_SLOTS if slot not in _CONDITION_SLOTS
    ):
        raise ValueError("expected a single condition, without ORDER BY, LIMIT, UNION and the like")
    node: ast.Node = stmt.whereClause
    return node


def conjuncts(template: str) -> list[str]:
    """The top-level AND terms of a compiled predicate, each as pglast prints it."""
    node = _parse_predicate(template)
    if isinstance(node, ast.BoolExpr) and node.boolop == BoolExprType.AND_EXPR:
        return [RawStream()(arg) for arg in node.args or ()]
    return [RawStream()(node)]


class _Checker(FastVisitor):
    """Load-time checks: only our parameters, unqualified columns outside subqueries."""

    def __init__(self, params: int) -> None:
        super().__init__()
        self.params = params
        self.problem = ""

    def visit_ParamRef(self, ancestors: Ancestor, node: ast.ParamRef) -> None:
        if not 1 <= (node.number or 0) <= self.params:
            self.problem = "use placeholders such as {principals}, not $n parameters"

    def visit_SubLink(self, ancestors: Ancestor, node: ast.SubLink) -> object:
        return Skip  # a subquery has its own tables; its names are its own business

    def visit_ColumnRef(self, ancestors: Ancestor, node: ast.ColumnRef) -> None:
        fields = node.fields or ()
        if len(fields) != 1 or not isinstance(fields[0], ast.String):
            self.problem = (
                "name the filtered table's columns unqualified (customer_id, not o.customer_id)"
            )


def _const(value: str | None) -> ast.A_Const:
    if value is None:
        return ast.A_Const(isnull=True)
    return ast.A_Const(isnull=False, val=ast.String(sval=value))


class _Fill(FastVisitor):
    def __init__(self, values: list[str | None]) -> None:
        super().__init__()
        self.values = values

    def visit_ParamRef(self, ancestors: Ancestor, node: ast.ParamRef) -> ast.Node:
        return _const(self.values[(node.number or 1) - 1])


class _Qualify(FastVisitor):
    """Prefix the top-level column names of a predicate with a range entry name."""

    def __init__(self, refname: str) -> None:
        super().__init__()
        self.refname = refname

    def visit_SubLink(self, ancestors: Ancestor, node: ast.SubLink) -> object:
        return Skip

    def visit_ColumnRef(self, ancestors: Ancestor, node: ast.ColumnRef) -> None:
        node.fields = (ast.String(sval=self.refname), *(node.fields or ()))


def qualify(predicate: ast.Node, refname: str) -> ast.Node:
    """Prefix the top-level column names of a predicate with a range entry name."""
    _Qualify(refname)(predicate)
    return predicate


def no_principals_notices(
    agent_type: str,
    principals: tuple[str, ...],
    applied: list[tuple[RelationRecord, RowFilter]],
) -> tuple[str, ...]:
    """A notice per table whose applied filter uses ``{principals}`` when the session
    has none: such a filter matches no row, and the agent must be able to tell "not
    yours" from "does not exist"."""
    if principals:
        return ()
    tables: dict[str, None] = {}
    for record, table_filter in applied:
        used = table_filter.for_role(record.role)
        if used is not None and "principals" in used.placeholders:
            tables.setdefault(used.table, None)
    return tuple(
        f"guardproxy: the row filter of {table} uses the session's principals and this "
        f"session has none, so it matches no rows of {table}: say whom you work for with "
        f"SET guard.principals = '...' or a /* principals='...' */ comment "
        f"(policy {agent_type}, row_filters.{table})"
        for table in tables
    )


def principals_literal(principals: tuple[str, ...]) -> str:
    """Postgres array input syntax with every element quoted: ``{"a","b\\"c"}``."""
    quoted = ('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in principals)
    return "{" + ",".join(quoted) + "}"


# rewrites an INSERT so that its rows must satisfy the filter (policy/insertcheck.py)
InsertCheck = Callable[
    [RelationRecord, "RowFilter", Mapping[str, str | None], tuple[str, ...] | None], None
]


def apply_row_filters(
    records: tuple[RelationRecord, ...],
    filters: Mapping[tuple[str, str], RowFilter],
    values: Mapping[str, str | None],
    readable: Mapping[tuple[str, str], tuple[str, ...] | None],
    pushed: Collection[tuple[str, str]] = (),
    table_columns: Mapping[tuple[str, str], tuple[str, ...] | None] | None = None,
    insert_check: InsertCheck | None = None,
) -> int:
    """Rewrite the tree the records point into; return how many places were filtered.

    `readable` gives, per filtered relation, the columns the wrapped subquery selects
    (None: ``*``); `table_columns` all its columns, for an INSERT without a column
    list into a table with an insert condition. For the relations in `pushed`, a read is filtered where it is when
    that means the same (see `push_predicate`), so that the table keeps its name and
    row type; elsewhere it is wrapped. `insert_check` rewrites an INSERT into a table
    with an insert condition (``policy/insertcheck.py``, which builds on this module).
    Raises `RewriteError` for uses that cannot be filtered.
    """
    count = 0
    for record in records:
        table_filter = filters.get(record.relation)
        if table_filter is None:
            continue
        role = record.role
        row_filter = table_filter.for_role(role)
        if row_filter is None:
            owner = record.owner
            copy_to = role == "copy" and isinstance(owner, ast.CopyStmt) and not owner.is_from
            if role in ("from", "update", "delete") or copy_to:
                continue  # a per-operation filter without a condition for this use
            row_filter = table_filter
        elif role == "insert":
            columns = (table_columns or {}).get(record.relation)
            if row_filter.template.strip().lower() != "true":
                if insert_check is None:
                    raise RewriteError(
                        f"INSERT into {row_filter.table} is not possible with its row filter",
                        row_filter.table,
                    )
                insert_check(record, row_filter, values, columns)
                count += 1
            continue
        if role == "from":
            if isinstance(record.owner, ast.RangeTableSample):
                raise RewriteError(
                    f"TABLESAMPLE cannot be used on {row_filter.table}", row_filter.table
                )
            if record.relation in pushed and push_predicate(record, row_filter.expression(values)):
                count += 1
                continue
            wrapped = _wrap(
                record.node, row_filter.expression(values), readable.get(record.relation)
            )
            _replace(record, wrapped)
        elif role in ("update", "delete"):
            stmt = record.owner
            assert isinstance(stmt, ast.UpdateStmt | ast.DeleteStmt)
            if isinstance(stmt.whereClause, ast.CurrentOfExpr):
                continue  # the cursor's query was filtered when it was declared
            alias = record.node.alias
            predicate = row_filter.expression(values)
            refname = alias.aliasname if alias is not None else record.node.relname
            _Qualify(refname or "")(predicate)
            stmt.whereClause = _and(stmt.whereClause, predicate)
        elif role == "copy" and isinstance(record.owner, ast.CopyStmt) and not record.owner.is_from:
            copy = record.owner
            cols = tuple(strings(copy.attlist))
            wrapped = _wrap(
                record.node, row_filter.expression(values), readable.get(record.relation)
            )
            copy.query = _select(cols, wrapped)
            copy.relation = None
            copy.attlist = None
        elif role in ("lock", "create", "other"):
            continue  # no rows are read or written through these
        else:
            verb = {"insert": "INSERT into", "merge": "MERGE into", "truncate": "TRUNCATE"}.get(
                role, "COPY into"
            )
            raise RewriteError(
                f"{verb} {row_filter.table} is not possible with its row filter", row_filter.table
            )
        count += 1
    return count


def push_predicate(record: RelationRecord, predicate: ast.Node) -> bool:
    """Add a filter predicate where a FROM item is read, if that means the same as
    wrapping it; False (nothing changed) when it would not:

    * an item of a FROM list (SELECT, UPDATE ... FROM, DELETE ... USING): to the WHERE;
    * a side of an inner join, the inner side of a LEFT / RIGHT join: to its ON.

    Not: the preserved side of an outer join, FULL joins, NATURAL / USING joins, MERGE
    sources, items with column aliases (the predicate names the table's columns).
    """
    rv = record.node
    alias = rv.alias
    if alias is not None and alias.colnames:
        return False
    owner, attr = record.owner, record.attr
    refname = alias.aliasname if alias is not None else rv.relname
    _Qualify(refname or "")(predicate)
    # FROM positions are SELECT / UPDATE fromClause and DELETE usingClause (collector)
    if isinstance(owner, ast.SelectStmt | ast.UpdateStmt | ast.DeleteStmt) and attr in (
        "fromClause",
        "usingClause",
    ):
        owner.whereClause = _and(owner.whereClause, predicate)
        return True
    if not isinstance(owner, ast.JoinExpr) or owner.quals is None or owner.isNatural:
        return False
    inner = {
        JoinType.JOIN_INNER: ("larg", "rarg"),
        JoinType.JOIN_LEFT: ("rarg",),
        JoinType.JOIN_RIGHT: ("larg",),
    }.get(owner.jointype or JoinType.JOIN_INNER, ())
    if attr not in inner:
        return False
    owner.quals = _and(owner.quals, predicate)
    return True


def _and(left: ast.Node | None, right: ast.Node) -> ast.Node:
    if left is None:
        return right
    return ast.BoolExpr(boolop=BoolExprType.AND_EXPR, args=(left, right))


def _select(
    cols: tuple[str, ...], source: ast.Node, where: ast.Node | None = None
) -> ast.SelectStmt:
    if cols:
        targets = tuple(
            ast.ResTarget(val=ast.ColumnRef(fields=(ast.String(sval=c),))) for c in cols
        )
    else:
        targets = (ast.ResTarget(val=ast.ColumnRef(fields=(ast.A_Star(),))),)
    return ast.SelectStmt(
        targetList=targets,
        fromClause=(source,),
        whereClause=where,
        op=SetOperation.SETOP_NONE,
    )


def _wrap(
    rv: ast.RangeVar, predicate: ast.Node, cols: tuple[str, ...] | None
) -> ast.RangeSubselect:
    inner = ast.RangeVar(
        catalogname=rv.catalogname,
        schemaname=rv.schemaname,
        relname=rv.relname,
        inh=rv.inh,
        relpersistence=rv.relpersistence,
    )
    alias = rv.alias if rv.alias is not None else ast.Alias(aliasname=rv.relname)
    return ast.RangeSubselect(
        lateral=False, subquery=_select(cols or (), inner, predicate), alias=alias
    )


def _replace(record: RelationRecord, new: ast.Node) -> None:
    current = getattr(record.owner, record.attr)
    if isinstance(current, tuple) and record.index is not None:
        items = list(current)
        items[record.index] = new
        setattr(record.owner, record.attr, tuple(items))
    else:
        setattr(record.owner, record.attr, new)
