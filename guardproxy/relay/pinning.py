"""Which statements keep state in one backend, so that their session must stay on it.

In transaction pooling a client gets whichever server is free. Some statements
leave something behind in the backend that ran them, past the end of the
transaction: ``LISTEN``, temporary tables (``CREATE TEMP``, ``SELECT ... INTO
TEMP``), session-level advisory locks (``pg_advisory_lock`` and friends, not
the ``_xact_`` ones), ``WITH HOLD`` cursors and ``LOAD``. (SQL-level ``PREPARE``
does not: the relay keeps prepared statements itself, see ``relay/session_sql.py``.)
A session that *runs* one is pinned to its server for the rest of its life.

The decision comes from the parse tree, never from the text alone: a literal
``'on hold'`` or a column named ``temp`` pins nothing. A cheap scan of the
lower-cased text runs first, and only a statement that mentions one of the
words is parsed. Code the proxy cannot see into (DO blocks, CALL, function
bodies) pins when such a word appears in it: it may create a temp table.
Unparseable text pins nothing: the server refuses it too.
"""

from __future__ import annotations

import re
from typing import Final

import pglast
from pglast import ast, visitors

# lower-cased text that may pin: only these statements are parsed
_MAY_PIN: Final = re.compile(rb"listen|temp|advisory_lock|hold|prepare|load")
_SESSION_LOCKS: Final = frozenset(
    (
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
    )
)
_CURSOR_OPT_HOLD: Final = 0x20
_OPAQUE = (ast.DoStmt, ast.CallStmt, ast.CreateFunctionStmt)


def pin_reason(sql: bytes) -> str | None:
    """Why running ``sql`` ties the session to its backend, or None."""
    if _MAY_PIN.search(sql.lower()) is None:
        return None
    try:
        statements = pglast.parse_sql(sql.decode(errors="replace"))
    except pglast.parser.ParseError:
        return None
    for raw in statements:
        reason = _statement_reason(raw.stmt)
        if reason is not None:
            return reason
    return None


def _statement_reason(node: ast.Node | None) -> str | None:
    if isinstance(node, ast.ListenStmt):
        return "LISTEN"
    if isinstance(node, ast.LoadStmt):
        return "LOAD"
    if isinstance(node, ast.DeclareCursorStmt) and (node.options or 0) & _CURSOR_OPT_HOLD:
        return "a WITH HOLD cursor"
    if isinstance(node, _OPAQUE):
        return "code the proxy cannot see into (it may create temporary objects)"
    if node is None:
        return None
    finder = _Finder()
    finder(node)
    return finder.reason


class _Finder(visitors.Visitor):
    """Temporary relations created and session-level advisory locks taken anywhere."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def visit_RangeVar(self, ancestors: object, node: ast.RangeVar) -> None:
        # a RangeVar that is created (CREATE TABLE, INTO, CREATE VIEW / SEQUENCE) carries
        # its persistence; one that is only read says 'p'
        if node.relpersistence == "t":
            self.reason = "a temporary relation"

    def visit_FuncCall(self, ancestors: object, node: ast.FuncCall) -> None:
        name = node.funcname[-1].sval if node.funcname else ""
        if name in _SESSION_LOCKS:
            self.reason = "a session-level advisory lock"

    def visit_DoStmt(self, ancestors: object, node: ast.DoStmt) -> None:
        self.reason = "code the proxy cannot see into (it may create temporary objects)"
