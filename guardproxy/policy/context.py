"""Session context: who the agent is, for which task and step, on behalf of whom.

Agents pass context three ways; the proxy keeps it per client session, across the
pooled server connections the session's statements run on:

* startup parameters ``guard.task``, ``guard.step``, ``guard.principals``,
  ``guard.<tag>`` (e.g. ``options=-c guard.task=T-17`` or libpq's ``PGOPTIONS``);
* ``SET guard.task = 'T-17'``: the judge reports these in ``Decision.context_updates``;
* a sqlcommenter-style comment anywhere in a statement,
  ``/* task='T-17',step='refund%202',principals='42%2C43' */``: `parse_context_comment`.

`SessionContext.with_updates()` applies any of the three (keys with or without the
``guard.`` prefix). ``principals`` is a comma-separated list. An empty value clears
the key. ``agent_id`` cannot be changed this way: it is the authenticated login.

Context is *declared by the agent*: row filters that use ``{principals}`` narrow what
an honest agent sees for the person it works for, they do not authenticate anyone.

`prepared` holds the SQL-level prepared statements of the session (``PREPARE name AS
...``), name -> the statement text as the judge returned it in
``Decision.prepared``; the judge needs it to judge ``EXECUTE name``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from urllib.parse import unquote

from guardproxy.safetext import describe_char, first_unsafe

MAX_TAGS = 64
MAX_KEY = 63
MAX_VALUE = 1024


class FrozenMap(Mapping[str, str]):
    """An immutable, hashable str -> str mapping."""

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[str, str] | None = None) -> None:
        self._data: dict[str, str] = dict(data or {})
        self._hash: int | None = None

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self._data) == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


@dataclass(frozen=True)
class SessionContext:
    agent_id: str
    task: str | None = None
    step: str | None = None
    principals: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=FrozenMap)
    prepared: Mapping[str, str] = field(default_factory=FrozenMap)

    def __post_init__(self) -> None:
        if not isinstance(self.tags, FrozenMap):
            object.__setattr__(self, "tags", FrozenMap(self.tags))
        if not isinstance(self.prepared, FrozenMap):
            object.__setattr__(self, "prepared", FrozenMap(self.prepared))
        object.__setattr__(self, "principals", tuple(self.principals))

    def with_updates(self, updates: Mapping[str, str]) -> SessionContext:
        """Apply context keys from SET guard.*, a comment or startup parameters."""
        if not updates:
            return self
        task, step, principals = self.task, self.step, self.principals
        tags = dict(self.tags)
        for raw_key, raw_value in updates.items():
            key = raw_key.lower().removeprefix("guard.")
            value = raw_value[:MAX_VALUE]
            if key == "task":
                task = value or None
            elif key == "step":
                step = value or None
            elif key == "principals":
                principals = tuple(p.strip() for p in value.split(",") if p.strip())
            elif key == "agent_id" or not key or len(key) > MAX_KEY:
                continue
            elif not value:
                tags.pop(key, None)
            elif key in tags or len(tags) < MAX_TAGS:
                tags[key] = value
        return replace(self, task=task, step=step, principals=principals, tags=FrozenMap(tags))

    def with_prepared(self, name: str, sql: str | None) -> SessionContext:
        """Remember (or forget, with None; all, with name "") a SQL-level prepared statement."""
        prepared = dict(self.prepared)
        if name == "" and sql is None:
            prepared.clear()
        elif sql is None:
            prepared.pop(name, None)
        else:
            prepared[name] = sql
        return replace(self, prepared=FrozenMap(prepared))

    def placeholder_values(self) -> dict[str, str | None]:
        """Values for row-filter placeholders ({principals} is encoded by the caller)."""
        values: dict[str, str | None] = {
            "agent_id": self.agent_id,
            "task": self.task,
            "step": self.step,
        }
        for key, value in self.tags.items():
            values[f"tag.{key}"] = value
        return values


# -- validation at the door ---------------------------------------------------------

CONTEXT_VALUE_SQLSTATE = "22023"  # invalid_parameter_value


def context_value_problem(key: str, value: str) -> str | None:
    """What is wrong with one agent-chosen context key/value, or None when it may be kept.

    Context reaches the audit record, the admin console, logs and terminals, so a
    value must be printable text: no control characters (NUL, newline, escape...),
    no format characters (bidi overrides, zero-width characters), no lone surrogates
    (bytes that were not UTF-8), and at most MAX_VALUE bytes of UTF-8 (MAX_KEY
    characters for a key). Pure; the caller refuses the statement, the SET or the
    login with SQLSTATE ``CONTEXT_VALUE_SQLSTATE`` (22023, invalid_parameter_value)
    and this text as the message. An empty value is fine (it clears the key).
    """
    name = key.lower().removeprefix("guard.")
    bad = first_unsafe(key)
    if bad is not None:
        return (
            f"context key {key!r} contains {describe_char(bad)}; context keys must be "
            "printable text"
        )
    if len(name) > MAX_KEY:
        return f"context key {key[:40]!r}... is longer than {MAX_KEY} characters"
    bad = first_unsafe(value)
    if bad is not None:
        return (
            f"context value of {name} contains {describe_char(bad)}; context values "
            "(task, step, principals, tags) must be printable text without control or "
            "format characters: percent-encoding in a comment is decoded first"
        )
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_VALUE:
        return (
            f"context value of {name} is {size} bytes long; context values may be at "
            f"most {MAX_VALUE} bytes (UTF-8)"
        )
    return None


# -- sqlcommenter comments ---------------------------------------------------------

# Things to skip over so that a /* inside them is not taken for a comment.
_TOKEN = re.compile(
    r"""
      (?P<estring>[Ee]'(?:[^'\\]|\\.|'')*')
    | (?P<string>'(?:[^']|'')*')
    | (?P<ident>"(?:[^"]|"")*")
    | (?P<dollar>\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?\$)
    | (?P<line>--[^\n]*)
    | (?P<block>/\*)
    """,
    re.VERBOSE | re.DOTALL,
)
_PAIR = re.compile(r"\s*([^\s=,']+)\s*=\s*'((?:[^'\\]|\\.)*)'\s*(,|$)", re.DOTALL)


def parse_context_comment(sql: str) -> dict[str, str]:
    """Key/values of every sqlcommenter comment in `sql` (later ones win).

    A comment counts only if its whole body is ``key='value'`` pairs separated by
    commas; keys and values are URL-decoded and ``\\'`` stands for a quote.
    Comments inside string literals, quoted identifiers and dollar quotes are ignored.
    """
    if "/*" not in sql:
        return {}
    found: dict[str, str] = {}
    pos = 0
    while True:
        match = _TOKEN.search(sql, pos)
        if match is None:
            break
        kind = match.lastgroup
        if kind == "dollar":
            end = sql.find(match.group(0), match.end())
            pos = len(sql) if end < 0 else end + len(match.group(0))
        elif kind == "block":
            body, pos = _block_comment(sql, match.end())
            found.update(_pairs(body))
        else:
            pos = match.end()
    return found


def _block_comment(sql: str, start: int) -> tuple[str, int]:
    """The body of a (possibly nested) block comment opened just before `start`."""
    depth, i = 1, start
    while depth and i < len(sql):
        if sql.startswith("/*", i):
            depth, i = depth + 1, i + 2
        elif sql.startswith("*/", i):
            depth, i = depth - 1, i + 2
        else:
            i += 1
    end = i - 2 if depth == 0 else len(sql)
    return sql[start:end], i


def _pairs(body: str) -> dict[str, str]:
    text = body.strip()
    if not text:
        return {}
    out: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        match = _PAIR.match(text, pos)
        if match is None:
            return {}  # an ordinary comment, not sqlcommenter
        key = unquote(match.group(1))
        value = unquote(match.group(2).replace("\\'", "'"))
        out[key] = value
        pos = match.end()
    return out
