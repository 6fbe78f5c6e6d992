"""Row caps of reads (``limits.max_rows_returned``): the server stops at N + 1 rows.

The runtime counts the rows it forwards and cuts at N (truncate with a WARNING, or an
error); the judge makes the server stop early by giving every query whose rows reach
the client a ``LIMIT`` of at most N + 1 (the extra row tells the runtime that the
result was cut). Queries capped:

* a root SELECT / VALUES / TABLE, set operations included (the LIMIT applies to the
  whole ``UNION``);
* the query of ``DECLARE ... CURSOR FOR``, of ``PREPARE ... AS SELECT``, of
  ``COPY (query) TO`` (``COPY t TO`` becomes ``COPY (SELECT ... FROM t LIMIT n) TO``).

Not capped: EXPLAIN (its rows are the plan), SELECT INTO and CREATE TABLE AS (no
rows reach the client), RETURNING of writes (``max_rows_affected`` bounds those).

An existing LIMIT is kept when it is a constant no larger than N, a larger constant
becomes N + 1, anything else (a parameter, an expression, ``LIMIT ALL``) becomes
``LEAST(<it>, N + 1)`` (``LEAST`` ignores NULL, so ``LIMIT NULL`` is capped too).
``FETCH FIRST n ROWS WITH TIES`` returns every row that ties with the n-th, however
many (with ``ORDER BY`` a constant, the whole table): its query is kept as it is and
wrapped, ``SELECT * FROM (<query>) AS guardproxy_capped LIMIT N + 1`` (its WITH
list moves out, so a writable CTE stays at the top). A subquery's LIMIT, OFFSET and
set operations cannot widen the root LIMIT; a cursor's rows are bounded by the
LIMIT of its ``DECLARE`` and counted by the runtime over all its FETCHes.

Two ways to apply it:

* `plan()` says ``append``: a root SELECT or DECLARE without LIMIT / FETCH FIRST gets the text
  ``\\nLIMIT n`` appended at the end of its statement text (`append_limits`): the
  agent's text is kept, and since the edit depends only on the statement's shape the
  judge caches the decision and re-applies the edit to each message of that shape;
* `cap_tree()`: everything else (and every statement of a message the judge prints
  from the tree anyway), on the parse tree.
"""

from __future__ import annotations

from collections.abc import Sequence

from pglast import ast, parser
from pglast.enums import LimitOption, MinMaxOp, SetOperation
from pglast.visitors import Ancestor

from ..analysis.visiting import FastVisitor

CAPPED_ALIAS = "guardproxy_capped"


def _count(value: int) -> ast.A_Const:
    return ast.A_Const(isnull=False, val=ast.Integer(ival=value))


def returns_rows(raw: ast.RawStmt) -> bool:
    """True when the statement sends query rows to the client (or declares a cursor)."""
    stmt = raw.stmt
    if isinstance(stmt, ast.SelectStmt):
        return stmt.intoClause is None
    if isinstance(stmt, ast.FetchStmt):
        return not stmt.ismove
    if isinstance(stmt, ast.CopyStmt):
        return not stmt.is_from and not isinstance(stmt.query, _WRITES)
    return isinstance(stmt, ast.DeclareCursorStmt)


_WRITES = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)


def cursor_of(raw: ast.RawStmt) -> tuple[str, str] | None:
    """("fetch", name) for a FETCH, ("declare", name) for a DECLARE: the runtime counts
    the rows each cursor delivered, so the cap holds across all its FETCHes."""
    stmt = raw.stmt
    if isinstance(stmt, ast.FetchStmt) and not stmt.ismove and stmt.portalname:
        return "fetch", stmt.portalname
    if isinstance(stmt, ast.DeclareCursorStmt) and stmt.portalname:
        return "declare", stmt.portalname
    return None


def explainable(raw: ast.RawStmt) -> bool:
    """A read whose plan the runtime can estimate (SELECT without INTO, DECLARE CURSOR,
    and the query a COPY ... TO or an EXPLAIN ANALYZE runs)."""
    stmt = raw.stmt
    if isinstance(stmt, ast.SelectStmt):
        return stmt.intoClause is None
    return isinstance(stmt, ast.DeclareCursorStmt) or executed_query(stmt) is not None


def executed_query(stmt: ast.Node | None) -> ast.Node | None:
    """The read a COPY (query) TO or an EXPLAIN ANALYZE runs to the end, or None."""
    copies = isinstance(stmt, ast.CopyStmt) and not stmt.is_from
    if not (copies or (isinstance(stmt, ast.ExplainStmt) and _analyzes(stmt))):
        return None
    query = stmt.query  # type: ignore[union-attr]
    if isinstance(query, ast.SelectStmt) and query.intoClause is None:
        return query
    return query if isinstance(query, ast.ExecuteStmt) else None


def _analyzes(stmt: ast.ExplainStmt) -> bool:
    for option in stmt.options or ():
        if isinstance(option, ast.DefElem) and option.defname == "analyze":
            arg = option.arg
            value = getattr(arg, "sval", None) or getattr(arg, "boolval", None)
            return arg is None or str(value).lower() not in ("false", "off", "0", "no")
    return False


def _query(raw: ast.RawStmt) -> ast.SelectStmt | None:
    """The query whose rows the statement returns, if it is a SELECT."""
    stmt = raw.stmt
    if isinstance(stmt, ast.SelectStmt):
        return stmt if stmt.intoClause is None else None
    if isinstance(stmt, ast.DeclareCursorStmt | ast.PrepareStmt | ast.CopyStmt):
        if isinstance(stmt, ast.CopyStmt) and stmt.is_from:
            return None
        query = stmt.query
        return query if isinstance(query, ast.SelectStmt) else None
    return None


def _with_ties(query: ast.SelectStmt) -> bool:
    return query.limitOption == LimitOption.LIMIT_OPTION_WITH_TIES


def plan(raw: ast.RawStmt, max_rows: int) -> str:
    """How the statement is capped: ``none`` (no query rows), ``append`` (text suffix),
    ``tree`` (on the tree) or ``kept`` (its own constant LIMIT is small enough)."""
    stmt = raw.stmt
    if isinstance(stmt, ast.CopyStmt) and not stmt.is_from and stmt.relation is not None:
        return "tree"
    query = _query(raw)
    if query is None:
        return "none"
    if _with_ties(query):
        return "tree"  # ties can widen any count
    count = query.limitCount
    if count is None:
        return "append" if isinstance(stmt, ast.SelectStmt | ast.DeclareCursorStmt) else "tree"
    if (
        isinstance(count, ast.A_Const)
        and isinstance(count.val, ast.Integer)
        and (count.val.ival or 0) <= max_rows
    ):
        return "kept"
    return "tree"


def suffix(max_rows: int) -> str:
    """The text appended to a statement (the newline ends a trailing ``--`` comment)."""
    return f"\nLIMIT {max_rows + 1}"


def append_limits(sql: str, indices: Sequence[int], max_rows: int) -> str:
    """`sql` with the LIMIT suffix after the statements at `indices` (0-based)."""
    if not indices:
        return sql
    slices = parser.split(sql, only_slices=True)
    text = suffix(max_rows)
    out: list[str] = []
    pos = 0
    for index in sorted(indices):
        end = slices[index].stop
        out.append(sql[pos:end])
        out.append(text)
        pos = end
    out.append(sql[pos:])
    return "".join(out)


def cap_tree(raw: ast.RawStmt, max_rows: int) -> bool:
    """Cap the statement's query on the tree; True when something changed."""
    stmt = raw.stmt
    cap = max_rows + 1
    if isinstance(stmt, ast.CopyStmt) and not stmt.is_from and stmt.relation is not None:
        columns = tuple(
            ast.ResTarget(val=ast.ColumnRef(fields=(ast.String(sval=c.sval),)))
            for c in stmt.attlist or ()
            if isinstance(c, ast.String)
        ) or (ast.ResTarget(val=ast.ColumnRef(fields=(ast.A_Star(),))),)
        stmt.query = ast.SelectStmt(
            targetList=columns,
            fromClause=(stmt.relation,),
            op=SetOperation.SETOP_NONE,
            limitCount=_count(cap),
            limitOption=LimitOption.LIMIT_OPTION_COUNT,
        )
        stmt.relation = None
        stmt.attlist = None
        return True
    query = _query(raw)
    if query is None:
        return False
    if _with_ties(query):
        _replace_query(raw, query, _wrapped(query, cap))
        return True
    count = query.limitCount
    if count is None:
        query.limitCount = _count(cap)
        query.limitOption = LimitOption.LIMIT_OPTION_COUNT
        return True
    if isinstance(count, ast.A_Const) and isinstance(count.val, ast.Integer):
        if (count.val.ival or 0) <= max_rows:
            return False
        query.limitCount = _count(cap)
        return True
    query.limitCount = ast.MinMaxExpr(op=MinMaxOp.IS_LEAST, args=(count, _count(cap)))
    return True


def _wrapped(query: ast.SelectStmt, cap: int) -> ast.SelectStmt:
    """``SELECT * FROM (<query>) AS guardproxy_capped LIMIT cap``, the WITH list outside."""
    with_clause, query.withClause = query.withClause, None
    return ast.SelectStmt(
        targetList=(ast.ResTarget(val=ast.ColumnRef(fields=(ast.A_Star(),))),),
        fromClause=(ast.RangeSubselect(subquery=query, alias=ast.Alias(aliasname=CAPPED_ALIAS)),),
        withClause=with_clause,
        op=SetOperation.SETOP_NONE,
        limitCount=_count(cap),
        limitOption=LimitOption.LIMIT_OPTION_COUNT,
    )


def _replace_query(raw: ast.RawStmt, query: ast.SelectStmt, new: ast.SelectStmt) -> None:
    stmt = raw.stmt
    if stmt is query:
        raw.stmt = new
    else:
        assert isinstance(stmt, ast.DeclareCursorStmt | ast.PrepareStmt | ast.CopyStmt)
        stmt.query = new


class _NullTies(FastVisitor):
    def visit_SelectStmt(self, ancestors: Ancestor, node: ast.SelectStmt) -> None:
        count = node.limitCount
        if _with_ties(node) and isinstance(count, ast.A_Const) and count.isnull:
            # pglast prints a NULL count as ALL, which WITH TIES does not accept; the
            # typed NULL keeps Postgres' own error ("row count cannot be null").
            node.limitCount = ast.TypeCast(
                arg=ast.A_Const(isnull=True),
                typeName=ast.TypeName(
                    names=(ast.String(sval="pg_catalog"), ast.String(sval="int8"))
                ),
            )


def printable(raw: ast.RawStmt) -> None:
    """Make the tree print as valid SQL where pglast would not (``FETCH FIRST NULL ROWS
    WITH TIES``); call before printing a statement guardproxy rewrote."""
    _NullTies()(raw)
