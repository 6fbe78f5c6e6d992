"""Auto-prepare: unnamed statements sent again and again are prepared once per server
connection, under their server name, so that Postgres parses and analyzes them once
per connection instead of at every execution.

``AutoPrepare`` counts the unnamed statements of each agent type (their text as sent,
parameter types and search_path) and names the ones seen ``after`` times. One is shared
by the sessions of a process; what it remembers is bounded. The client never sees the
difference: its Parse is answered ParseComplete at once when the lent server already
has the statement (prepared there before, the same text for the same search_path), its
Bind and Describe go to the server's name, and errors name its unnamed statement.

``Replay`` keeps a round's client messages from a Bind of an auto-prepared statement
to its Sync. If Postgres answers that Bind "cached plan must not change result type"
(a DDL changed what the statement returns), the error is not the client's to see: its
unnamed statement would have been parsed again. The relay then prepares it again and
runs the round once more, which is only possible when nothing else was sent to the
server in between and no transaction was open. Pure: no sockets.
"""

from __future__ import annotations

from typing import Final

from guardproxy.relay.registry import Statement, server_statement_name

# Statement texts remembered (counted, or named) per process; past this the oldest go.
REMEMBERED: Final = 8192

_Key = tuple[str, bytes, bytes, str]


class AutoPrepare:
    """Which unnamed statements are worth preparing on the servers."""

    __slots__ = ("_counts", "_names", "after")

    def __init__(self, after: int) -> None:
        self.after: Final = max(after, 1)  # uses of a text before it is prepared
        self._counts: dict[_Key, int] = {}
        self._names: dict[_Key, bytes] = {}

    def name(self, agent_type: str, sent: bytes, types: bytes, search_path: str) -> bytes | None:
        """The server name to prepare this unnamed statement under, or None (not yet)."""
        key = (agent_type, sent, types, search_path)
        name = self._names.get(key)
        if name is not None:
            return name
        count = self._counts.get(key, 0) + 1
        if count < self.after:
            if len(self._counts) >= REMEMBERED:
                del self._counts[next(iter(self._counts))]
            self._counts[key] = count
            return None
        self._counts.pop(key, None)
        if len(self._names) >= REMEMBERED:
            del self._names[next(iter(self._names))]
        name = server_statement_name(sent, types, search_path)
        self._names[key] = name
        return name


class Replay:
    """A round's client messages from a Bind of an auto-prepared statement on."""

    __slots__ = ("closed_at", "failed", "messages", "statement")

    def __init__(self, bind: bytes, statement: Statement) -> None:
        self.statement: Final = statement
        self.messages: list[tuple[int, bytes]] = [(ord("B"), bind)]
        self.closed_at = 0  # the round ends at the answer to this many Syncs and Queries
        self.failed = False  # Postgres said the statement's plan is stale: run it again

    @property
    def closed(self) -> bool:
        return self.closed_at > 0
