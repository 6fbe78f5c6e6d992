"""The policy engine as a session sees it: judge one Query or Parse message.

``Guard.judge`` returns the message to forward (unchanged, or rewritten) or
raises GuardError with the denial the client must see. It also keeps the
agent's context (task, step, principals, tags) current from comments and
``SET guard.*`` statements.
"""

from __future__ import annotations

from typing import Protocol


class Guard(Protocol):
    def judge(self, kind: int, raw: bytes) -> bytes: ...
