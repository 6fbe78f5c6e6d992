"""SQL-level ``PREPARE``, ``EXECUTE`` and ``DEALLOCATE``, resolved through the statement registry.

Postgres keeps one namespace of prepared statements per session: a statement
prepared with SQL can be bound with the extended protocol, and one prepared with
a Parse message can be run with ``EXECUTE``. guardproxy keeps that namespace in
its registry (``relay/registry.py``) instead of in one backend, so none of these
pins a session, and every execution runs under the policy and context of its
moment:

* ``PREPARE name [(types)] AS statement`` becomes a registry statement whose text
  is the statement with each parameter cast to its declared type
  (``$1`` -> ``($1::int)``): prepared on a server with a Parse like any other.
* ``EXECUTE name [(args)]`` runs the registry statement on the server under its
  server name (``EXECUTE gp_<hash>(args)``).
* ``DEALLOCATE [PREPARE] name | ALL`` drops registry statements.

Each must be a statement of its own message: mixed with others (or under
``EXPLAIN`` or ``CREATE TABLE ... AS``) it is refused. Pure: parses with pglast.
"""

from __future__ import annotations

import re
from typing import Final

import pglast
from pglast import ast

_MAYBE: Final = re.compile(rb"prepare|execute|deallocate")  # in the lower-cased text
_COMMENTS: Final = frozenset(("C_COMMENT", "SQL_COMMENT"))


class Prepare:
    __slots__ = ("inner", "name")

    def __init__(self, name: bytes, inner: bytes) -> None:
        self.name: Final = name
        self.inner: Final = inner  # the statement, parameters cast to their declared types


class Execute:
    __slots__ = ("args", "name")

    def __init__(self, name: bytes, args: bytes) -> None:
        self.name: Final = name
        self.args: Final = args  # the text between the parentheses, b"" without any


class Deallocate:
    __slots__ = ("name",)

    def __init__(self, name: bytes | None) -> None:
        self.name: Final = name  # None: DEALLOCATE ALL


class Mixed:
    """One of them inside a message with other statements, or nested in another."""

    __slots__ = ("command",)

    def __init__(self, command: str) -> None:
        self.command: Final = command


Command = Prepare | Execute | Deallocate | Mixed
# A command as plain values, for a trip between processes (compiled classes do not pickle)
CommandParts = tuple[str, bytes | str | None, bytes]


def command_parts(command: Command) -> CommandParts:
    if isinstance(command, Prepare):
        return ("PREPARE", command.name, command.inner)
    if isinstance(command, Execute):
        return ("EXECUTE", command.name, command.args)
    if isinstance(command, Deallocate):
        return ("DEALLOCATE", command.name, b"")
    return ("MIXED", command.command, b"")


def command_from_parts(parts: CommandParts) -> Command:
    kind, name, rest = parts
    if kind == "PREPARE":
        assert isinstance(name, bytes)
        return Prepare(name, rest)
    if kind == "EXECUTE":
        assert isinstance(name, bytes)
        return Execute(name, rest)
    if kind == "DEALLOCATE":
        assert name is None or isinstance(name, bytes)
        return Deallocate(name)
    assert isinstance(name, str)
    return Mixed(name)


def prepared_command(text: bytes) -> Command | None:
    """What ``text`` (a simple Query) does with prepared statements, or None: nothing."""
    if _MAYBE.search(text.lower()) is None:
        return None
    sql = text.decode(errors="replace")
    try:
        statements = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return None  # the judge (or the server) says what is wrong with it
    found: list[ast.Node] = []
    for raw in statements:
        node = raw.stmt
        if isinstance(node, ast.PrepareStmt | ast.ExecuteStmt | ast.DeallocateStmt):
            found.append(node)
        elif isinstance(node, ast.ExplainStmt | ast.CreateTableAsStmt) and isinstance(
            node.query, ast.ExecuteStmt
        ):
            return Mixed("EXECUTE")
    if not found:
        return None
    if len(statements) > 1:
        return Mixed(_command_name(found[0]))
    node = found[0]
    # the scanner's offsets count characters
    tokens = [t for t in pglast.parser.scan(sql) if t.name not in _COMMENTS]
    if isinstance(node, ast.DeallocateStmt):
        return Deallocate(node.name.encode() if node.name is not None else None)
    if isinstance(node, ast.ExecuteStmt):
        return Execute((node.name or "").encode(), _parenthesized(sql, tokens, 2).encode())
    assert isinstance(node, ast.PrepareStmt)
    return Prepare((node.name or "").encode(), _typed_statement(sql, tokens).encode())


def _command_name(node: ast.Node) -> str:
    if isinstance(node, ast.PrepareStmt):
        return "PREPARE"
    if isinstance(node, ast.ExecuteStmt):
        return "EXECUTE"
    return "DEALLOCATE"


def _parenthesized(sql: str, tokens: list[pglast.parser.Token], at: int) -> str:
    """The text inside the parentheses that open at token ``at`` ("" when none do)."""
    if at >= len(tokens) or tokens[at].name != "ASCII_40":
        return ""
    depth = 0
    for token in tokens[at:]:
        if token.name == "ASCII_40":
            depth += 1
        elif token.name == "ASCII_41":
            depth -= 1
            if depth == 0:
                return sql[tokens[at].end + 1 : token.start]
    return ""


def _typed_statement(sql: str, tokens: list[pglast.parser.Token]) -> str:
    """The statement of a PREPARE, each ``$n`` cast to the n-th declared type."""
    types = _split_types(_parenthesized(sql, tokens, 2))
    as_index = next(i for i, t in enumerate(tokens) if t.name == "AS")
    start = tokens[as_index].end + 1
    out: list[str] = []
    pos = start
    for token in tokens[as_index + 1 :]:
        if token.name != "PARAM":
            continue
        number = int(sql[token.start + 1 : token.end + 1])
        if 1 <= number <= len(types) and types[number - 1]:
            out.append(sql[pos : token.start])
            out.append(f"(${number}::{types[number - 1]})")
            pos = token.end + 1
    out.append(sql[pos:])
    return "".join(out).strip()


def _split_types(text: str) -> list[str]:
    """``int, numeric(10, 2), text`` -> the three type names (commas inside parentheses kept)."""
    if not text.strip():
        return []
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts
