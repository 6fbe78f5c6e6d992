"""What the MCP tools accept as SQL, and how a statement's rows are read. Pure.

This is input hygiene, not policy: the proxy judges every statement the tools send.
`check_statement(sql)` refuses, with `InputRefused` saying what to do instead:

* a text with no statement, or with more than one (each call runs one statement,
  in a transaction of its own: the ``COMMIT; DROP ...`` escape has nothing to escape);
* transaction control (``BEGIN``, ``COMMIT``, ``SAVEPOINT``...): there is no
  transaction across calls to control;
* ``COPY``: the tools have no COPY data channel.

It returns a `StatementShape`, or None when the text does not parse (the proxy then
answers with the parser's error, as it would to any client):

* ``cursor``: a read that ``DECLARE ... CURSOR`` can hold (``SELECT``, ``VALUES``,
  ``TABLE`` with no writable CTE and no ``INTO``): its rows are fetched a few at a
  time and no more than the result can show are read;
* ``plannable``: ``EXPLAIN`` may be put in front of it (``SELECT``, ``INSERT``,
  ``UPDATE``, ``DELETE``, ``MERGE``), for the explain tool's plan estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

from pglast import ast

from ..analysis import SqlSyntaxError, StatementClass
from ..analysis.analyzer import analyze_tree

_PLANNABLE = (ast.SelectStmt, ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)


class InputRefused(ValueError):
    """The tool call's SQL is not something the tool runs; the message says why and what to do."""


@dataclass(frozen=True)
class StatementShape:
    command: str
    cursor: bool
    plannable: bool


def check_statement(sql: str) -> StatementShape | None:
    """See the module docstring."""
    try:
        analyzed = analyze_tree(sql)
    except SqlSyntaxError:
        return None
    if not analyzed:
        raise InputRefused("the SQL holds no statement: send one SQL statement")
    if len(analyzed) > 1:
        raise InputRefused(
            f"send one statement per call: this text holds {len(analyzed)} statements "
            "separated by ';'. Nothing was run. Each call runs one statement in a "
            "transaction of its own; make one call per statement."
        )
    raw, info = analyzed[0].raw, analyzed[0].info
    stmt = raw.stmt
    if info.kind is StatementClass.TRANSACTION:
        raise InputRefused(
            f"{info.command} is not used here: every call runs its statement in a "
            "transaction of its own, committed when it succeeds, so there is no "
            "transaction to open, commit or roll back. Nothing was run."
        )
    if isinstance(stmt, ast.CopyStmt):
        raise InputRefused(
            "COPY is not available through this tool: read rows with SELECT and write "
            "them with INSERT. Nothing was run."
        )
    cursor = (
        isinstance(stmt, ast.SelectStmt)
        and stmt.intoClause is None
        and info.is_read_only
        and not info.unsupported
    )
    return StatementShape(info.command, cursor, isinstance(stmt, _PLANNABLE))
