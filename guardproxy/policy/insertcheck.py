"""The ``insert`` condition of a row filter: every row an INSERT adds must pass it.

Like the ``WITH CHECK`` of Postgres' row-level security, and enforced by Postgres
in the same statement: the INSERT's rows are read from a subquery whose WHERE
calls ``guardproxy.check_insert(condition, message, hint)`` (migration 0005), which
raises 42501 with guardproxy's message for a row whose condition is not true
(NULL fails too), so the statement inserts all its rows or none::

    INSERT INTO comments (ticket_id, body) VALUES (7, 'hi'), (8, $1) RETURNING id
    -->
    INSERT INTO comments (ticket_id, body)
    SELECT guardproxy_new.ticket_id, guardproxy_new.body FROM (
        SELECT (CAST(NULL AS public.comments)).ticket_id, (CAST(NULL AS public.comments)).body
        WHERE false
        UNION ALL SELECT 7, 'hi'
        UNION ALL SELECT 8, $1) AS guardproxy_new (ticket_id, body)
    WHERE guardproxy.check_insert(<condition on guardproxy_new>, '<message>', '<hint>')
    RETURNING id

The first, empty branch has the table's column types, so that literals and
parameters of the agent's rows get the types they would have had in a plain
INSERT (a VALUES list in a subquery would type ``'2024-01-01'`` as text). The
INSERT's command tag, ``RETURNING`` and ``ON CONFLICT`` are unchanged. An
``INSERT ... SELECT`` becomes the second branch as it is.

Refused (`RewriteError`): ``DEFAULT VALUES`` and ``DEFAULT`` in a row (omit the
column instead), no column list when the catalog does not know the table's
columns, more than `MAX_ROWS` rows in one VALUES list (split the insert), and
column lists with subscripts or fields (``INSERT INTO t (a[1])``).
"""

from __future__ import annotations

from collections.abc import Mapping

from pglast import ast
from pglast.enums import SetOperation

from ..analysis.collector import RelationRecord
from .rowfilter import RewriteError, RowFilter, qualify

NEW = "guardproxy_new"
MAX_ROWS = 100


def _name(*parts: str) -> tuple[ast.String, ...]:
    return tuple(ast.String(sval=p) for p in parts)


def _text(value: str) -> ast.A_Const:
    return ast.A_Const(isnull=False, val=ast.String(sval=value))


def _typed_nulls(relation: tuple[str, str], columns: list[str]) -> ast.SelectStmt:
    """``SELECT (NULL::t).a, (NULL::t).b WHERE false``: no rows, the table's types."""
    row = ast.TypeCast(
        arg=ast.A_Const(isnull=True), typeName=ast.TypeName(names=_name(*relation), typemod=-1)
    )
    targets = tuple(
        ast.ResTarget(val=ast.A_Indirection(arg=row, indirection=_name(c))) for c in columns
    )
    return ast.SelectStmt(
        targetList=targets,
        whereClause=ast.A_Const(isnull=False, val=ast.Boolean(boolval=False)),
        op=SetOperation.SETOP_NONE,
    )


def _leaves(stmt: ast.InsertStmt, table: str) -> list[ast.SelectStmt]:
    source = stmt.selectStmt
    if not isinstance(source, ast.SelectStmt):
        raise RewriteError(
            f"INSERT ... DEFAULT VALUES into {table} cannot be checked against its row filter's "
            "insert condition: list the columns and their values",
            table,
        )
    if not source.valuesLists:
        return [source]
    if len(source.valuesLists) > MAX_ROWS:
        raise RewriteError(
            f"an INSERT into {table} may add at most {MAX_ROWS} rows in one VALUES list "
            "(each is checked against its row filter's insert condition): split it",
            table,
        )
    leaves = []
    for row in source.valuesLists:
        values = tuple(row)
        if any(isinstance(v, ast.SetToDefault) for v in values):
            raise RewriteError(
                f"DEFAULT in the VALUES of an INSERT into {table} cannot be checked against "
                "its row filter's insert condition: leave the column out of the column list",
                table,
            )
        leaves.append(
            ast.SelectStmt(
                targetList=tuple(ast.ResTarget(val=v) for v in values), op=SetOperation.SETOP_NONE
            )
        )
    return leaves


def add_insert_check(
    record: RelationRecord,
    check: RowFilter,
    values: Mapping[str, str | None],
    table_columns: tuple[str, ...] | None,
) -> None:
    """Rewrite the INSERT `record` belongs to (see the module docstring)."""
    stmt = record.owner
    table = check.table
    assert isinstance(stmt, ast.InsertStmt)
    if stmt.cols:
        if any(not isinstance(c, ast.ResTarget) or c.indirection for c in stmt.cols):
            raise RewriteError(
                f"an INSERT into {table} with subscripts or fields in its column list cannot be "
                "checked against its row filter's insert condition: name whole columns",
                table,
            )
        columns = [c.name or "" for c in stmt.cols]
    elif table_columns is not None:
        columns = list(table_columns)
    else:
        raise RewriteError(
            f"an INSERT into {table} must list its columns (its rows are checked against its "
            "row filter's insert condition)",
            table,
        )
    union: ast.SelectStmt = _typed_nulls(record.relation, columns)
    for leaf in _leaves(stmt, table):
        union = ast.SelectStmt(op=SetOperation.SETOP_UNION, all=True, larg=union, rarg=leaf)
    condition = qualify(check.expression(values), NEW)
    message, hint = check.denial
    verdict = ast.FuncCall(
        funcname=_name("guardproxy", "check_insert"),
        args=(condition, _text(message), _text(hint)),
    )
    stmt.selectStmt = ast.SelectStmt(
        targetList=tuple(ast.ResTarget(val=ast.ColumnRef(fields=_name(NEW, c))) for c in columns),
        fromClause=(
            ast.RangeSubselect(
                lateral=False,
                subquery=union,
                alias=ast.Alias(aliasname=NEW, colnames=_name(*columns)),
            ),
        ),
        whereClause=verdict,
        op=SetOperation.SETOP_NONE,
    )
    stmt.cols = tuple(ast.ResTarget(name=c) for c in columns)
