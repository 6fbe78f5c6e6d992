"""Idempotency keys of writes (``idempotency.mode``): which key a write carries.

* ``off``: none.
* ``explicit``: the write's ``idempotency_key`` tag (a sqlcommenter comment
  ``/* idempotency_key='k-17' */`` or ``SET guard.idempotency_key = 'k-17'``);
  writes without one run as usual.
* ``derived``: the tag when there is one, else a key derived from the agent type,
  agent id, task, step, the statement's text (tokens without comments, so a retry
  with another context comment is the same statement; literals kept, so ``WHERE id
  = 4`` and ``WHERE id = 5`` are two writes) and the Bind parameters. A derived key
  must name a *retry*, the same attempt sent again, never a deliberate repeat of the
  same text: it is derived only when the write carries both a task and a step (the
  step names the attempt). Without them there is no key.

Keys belong to one agent: they are namespaced by agent type and agent id
(``explicit:<type>:<n>:<agent id>:<key>``, n the length of the agent id;
``derived:<sha256>`` over both), so another agent can neither squat a key nor be
answered from a key it did not use. The runtime stores the write's answer under
the key with ``policy.idempotency_ttl``.
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
    agent_id: str = "",
) -> str | None:
    """The derived key of a write, or None without a task and a step (see the module
    docstring)."""
    if not task or not step:
        return None
    digest = hashlib.sha256()
    parts: list[bytes | None] = [
        agent_type.encode(),
        agent_id.encode(),
        task.encode(),
        step.encode(),
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
    agent_id: str = "",
) -> str | None:
    """The key of a write by agent ``agent_id`` of `policy`, or None (run it as usual)."""
    mode = policy.idempotency_mode
    if mode == "off":
        return None
    explicit = tags.get(TAG)
    if explicit:
        return f"explicit:{policy.name}:{len(agent_id)}:{agent_id}:{explicit}"
    if mode == "derived":
        return derive_key(policy.name, task, step, sql, params, agent_id)
    return None
