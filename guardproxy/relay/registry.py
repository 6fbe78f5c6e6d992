"""Every prepared statement and portal of one client session, and what was decided about each.

A ``Statement`` is one client statement (named, or the unnamed one): its text,
the parameter types it declared, the judgement it runs under (the text to send,
its caps, its write plan...) and the name it has on the servers. A ``Portal`` is
bound from one statement record and keeps that record: a later Parse of the same
name makes a new record and cannot change what an open portal runs.

The rules follow Postgres: a Parse of the unnamed statement replaces it, a named
one must not exist yet; Close, ``DEALLOCATE`` and ``DISCARD ALL`` drop; a simple
Query drops the unnamed statement and the unnamed portal; the end of a
transaction drops every portal bound before it. Pure: no sockets.

The relay records a client message here when it passes it on, before the server
has answered it: a pipelining client's next message may use the name. Each change
returns its ``Undo``, kept with the message's expected answer: when the server does
not take the message (it fails, or comes after an error and before the Sync, when
Postgres skips everything), the change is undone, so that a name is taken exactly
when Postgres has it taken.

On the servers a named statement is prepared under ``gp_<hash>`` of its sent
text, parameter types and search_path, on each server the first time it is used
there, and only if the copy there is at least as new as the client's Parse (the
*generation*): a client that prepares again must never get a copy made before.
The unnamed statement stays unnamed on the server: the record says which server
has it current, and it is parsed again anywhere else.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import TYPE_CHECKING, Any, Final

from guardproxy.protocol import codec

if TYPE_CHECKING:
    from guardproxy.relay.judging import Judgement

_generations = itertools.count(1)


def server_statement_name(sent: bytes, types: bytes, search_path: str = "") -> bytes:
    # search_path is part of what the text means: the same text under another
    # path is another statement (schema-per-tenant), so it gets another name.
    digest = hashlib.blake2b(
        sent + b"\x00" + types + b"\x00" + search_path.encode(), digest_size=20
    ).hexdigest()
    return b"gp_" + digest.encode()


class Statement:
    """One client statement and what was decided about it."""

    __slots__ = (
        "auto",
        "command",
        "generation",
        "judgement",
        "name",
        "round",
        "server_name",
        "text",
        "types",
    )

    def __init__(self, name: bytes, text: bytes, types: bytes, judgement: Judgement) -> None:
        self.name: Final = name
        self.text: Final = text  # the client's own SQL, judged again when its judgement expires
        self.types: Final = types  # parameter type count and OIDs, as the Parse carried them
        self.judgement = judgement
        self.server_name = b""  # set by the registry for named statements
        self.generation = next(_generations)
        # Syncs and Queries sent before its Parse: a DISCARD ALL answered later drops it
        # only if it came first
        self.round = 0
        # an SQL PREPARE or DEALLOCATE sent with a Parse message: the proxy runs it on
        # its registry when the portal is executed (relay/session_sql.py)
        self.command: object = None
        # an unnamed statement prepared on the servers under its server name (any copy
        # there will do: relay/autoprepare.py)
        self.auto = False

    def rejudged(self, judgement: Judgement, search_path: str) -> None:
        """The statement runs under a new judgement from now on: another text, another name."""
        self.judgement = judgement
        self.generation = next(_generations)
        if self.server_name:
            self.server_name = server_statement_name(judgement.sent, self.types, search_path)


class Portal:
    """One portal: the statement record it was bound from, and what it delivered so far."""

    __slots__ = ("bind", "bytes", "name", "round", "rows", "statement")

    def __init__(self, name: bytes, statement: Statement, bind: bytes, round: int = 0) -> None:
        self.name: Final = name
        self.statement: Final = statement
        self.bind: Final = bind  # the Bind as sent to the server (statement name translated)
        # Syncs and Queries sent before its Bind: a transaction that ends at one of them
        # drops it; one that ends at a later Sync (already sent, not yet answered) not
        self.round: Final = round
        self.rows = 0  # rows delivered over its Executes (a row cap holds per portal)
        self.bytes = 0  # bytes of row data delivered over its Executes

    @property
    def parameters(self) -> bytes:
        """The Bind's values, for idempotency (read only for writes that use them)."""
        return codec.bind_values(self.bind)


# One name as it was before a client message changed it: a portal's name (or a
# statement's), the name, and what it held (None: it was free).
# (a portal?, its name, the record before the message, the record the message left)
Undo = tuple[bool, bytes, "Statement | Portal | None", "Statement | Portal | None"]


class Registry:
    def __init__(self) -> None:
        self.statements: dict[bytes, Statement] = {}
        self.portals: dict[bytes, Portal] = {}

    def parse(self, statement: Statement, search_path: str, round: int = 0) -> Undo:
        """Records a Parse (sent after ``round`` Syncs and Queries); the caller has checked
        that a named one does not exist yet."""
        statement.round = round
        if statement.name:
            statement.server_name = server_statement_name(
                statement.judgement.sent, statement.types, search_path
            )
        before = self.statements.get(statement.name)
        self.statements[statement.name] = statement
        return (False, statement.name, before, statement)

    def statement(self, name: bytes) -> Statement | None:
        return self.statements.get(name)

    def close_statement(self, name: bytes) -> Undo:
        return (False, name, self.statements.pop(name, None), None)

    def bind(self, portal: Portal) -> Undo:
        before = self.portals.get(portal.name)
        self.portals[portal.name] = portal
        return (True, portal.name, before, portal)

    def portal(self, name: bytes) -> Portal | None:
        return self.portals.get(name)

    def close_portal(self, name: bytes) -> Undo:
        return (True, name, self.portals.pop(name, None), None)

    def undo(self, change: Undo, failed: bool) -> None:
        """Puts a name back as it was before a message the server did not take.
        ``failed``: that message itself failed (it was not skipped); a failed Parse of
        the unnamed statement leaves none, as Postgres drops the old one first. A name
        that a later message (after the Sync the server skipped to) has taken since stays
        that message's."""
        portal, name, before, after = change
        table: dict[bytes, Any] = self.portals if portal else self.statements
        if table.get(name) is not after:
            return
        if before is None or (failed and not name and not portal):
            table.pop(name, None)
        else:
            table[name] = before

    def simple_query(self) -> None:
        """A simple Query drops the unnamed statement and the unnamed portal."""
        self.statements.pop(b"", None)
        self.portals.pop(b"", None)

    def end_transaction(self, rounds: int | None = None) -> None:
        """Portals live until the end of their transaction: the one that ended at the
        answer to the ``rounds``-th Sync or Query (None: every one)."""
        if not self.portals:
            return
        if rounds is None:
            self.portals.clear()
            return
        for name in [name for name, portal in self.portals.items() if portal.round < rounds]:
            del self.portals[name]

    def deallocate_all(self, rounds: int | None = None) -> None:
        """DEALLOCATE ALL: every statement goes (those recorded before the ``rounds``-th
        Sync or Query was sent, the one that ran it; None: every one); open portals keep
        running."""
        if rounds is None:
            self.statements.clear()
            return
        for name in [n for n, s in self.statements.items() if s.round <= rounds]:
            del self.statements[name]

    def discard_all(self, rounds: int | None = None) -> None:
        """DISCARD ALL: statements and portals go (as for ``deallocate_all``)."""
        self.deallocate_all(rounds)
        if rounds is None:
            self.portals.clear()
            return
        for name in [n for n, p in self.portals.items() if p.round <= rounds]:
            del self.portals[name]
