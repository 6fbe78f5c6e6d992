"""Whether a statement reads or writes, for the ``kind`` label of a statement the judge
refused (the judge says why it refused, not what the statement was). Pure.
"""

from __future__ import annotations

import pglast
from pglast import ast

_WRITES = (
    ast.InsertStmt,
    ast.UpdateStmt,
    ast.DeleteStmt,
    ast.MergeStmt,
    ast.TruncateStmt,
)


def statement_kind(text: bytes) -> str:
    """``write`` when a statement of ``text`` changes rows (or cannot be read), else ``read``."""
    try:
        statements = pglast.parse_sql(text.decode(errors="replace"))
    except pglast.parser.ParseError:
        return "read"
    for raw in statements:
        node = raw.stmt
        if isinstance(node, _WRITES) or (isinstance(node, ast.CopyStmt) and node.is_from):
            return "write"
        with_clause = getattr(node, "withClause", None)
        if with_clause is not None and any(
            isinstance(cte.ctequery, _WRITES) for cte in with_clause.ctes or ()
        ):
            return "write"
    return "read"
