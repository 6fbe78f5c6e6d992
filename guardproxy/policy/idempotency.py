"""Idempotency keys of writes (``idempotency.mode``): which key a write carries.

* ``off``: none.
* ``explicit``: the write's ``idempotency_key`` tag (a sqlcommenter comment
  ``/* idempotency_key='k-17' */`` or ``SET guard.idempotency_key = 'k-17'``);
  writes without one run as usual.
* ``derived``: the tag when there is one, else a key derived from the agent type,
  task, step, the statement's text (tokens without comments, so a retry with another
  context comment is the same statement; literals kept, so ``WHERE id = 4`` and
  ``WHERE id = 5`` are two writes) and the Bind parameters. Without a task there is
  no key: nothing tells a retry from a second, deliberate identical write.

Keys are namespaced by agent type (``explicit:<type>:<key>``, ``derived:<sha256>``),
so that two types using the same key never see each other's answers. The runtime
stores the write's answer under the key with ``policy.idempotency_ttl``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from pglast import parser

from .agent import AgentPolicy

_COMMENTS = frozenset({"C_COMMENT", "SQL_COMMENT"})
TAG = "idempotency_key"


def canonical_text(sql: str) -> str:
    """The statement's tokens, comments dropped, one space apart (literals kept)."""
    try:
        tokens = parser.scan(sql)
    except parser.ParseError:
        return sql.strip()
    return " ".join(sql[t.start : t.end + 1] for t in tokens if t.name not in _COMMENTS)


def derive_key(
    agent_type: str,
    task: str | None,
    step: str | None,
    sql: str,
    params: Sequence[bytes | str | None] = (),
) -> str | None:
    """The derived key of a write, or None without a task (see the module docstring)."""
    if not task:
        return None
    digest = hashlib.sha256()
    parts: list[bytes | None] = [
        agent_type.encode(),
        task.encode(),
        (step or "").encode(),
        canonical_text(sql).encode(),
        *(p.encode() if isinstance(p, str) else p for p in params),
    ]
    for part in parts:
        # length-prefixed, so that no two different lists hash alike; NULL is -1
        digest.update(b"-1;" if part is None else f"{len(part)};".encode() + part)
    return "derived:" + digest.hexdigest()


def idempotency_key(
    policy: AgentPolicy,
    tags: Mapping[str, str],
    task: str | None,
    step: str | None,
    sql: str,
    params: Sequence[bytes | str | None] = (),
) -> str | None:
    """The key of a write by an agent of `policy`, or None (run it as usual)."""
    mode = policy.idempotency_mode
    if mode == "off":
        return None
    explicit = tags.get(TAG)
    if explicit:
        return f"explicit:{policy.name}:{explicit}"
    if mode == "derived":
        return derive_key(policy.name, task, step, sql, params)
    return None
