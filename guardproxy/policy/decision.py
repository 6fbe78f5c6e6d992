"""`Decision`: what the judge says about one message's SQL, and what the proxy does with it.

* ``allow``: send `sql` (the input, unchanged) upstream.
* ``rewrite``: send `sql` (a rewritten text, e.g. with row filters) instead of the input.
* ``deny``: send nothing upstream; answer the client with an ErrorResponse carrying
  `sqlstate`, `reason` as the message and `hint` as the HINT. Inside a transaction
  block the proxy must leave the client's transaction in the failed state, as a
  server error would (e.g. by sending the upstream a statement that fails, or by
  tracking the failed state itself and refusing everything but ROLLBACK).

Fields for the proxy's bookkeeping:

* `monitored`: mode ``monitor`` turned what would have been a denial (or a rewrite)
  into an ``allow`` of the original SQL; `rule` / `reason` say what would have
  happened. Log and count it.
* `context_updates`: ``SET guard.task = ...`` style statements in the message
  (keys ``guard.task``, ``guard.step``, ``guard.principals``, ``guard.<tag>``; an
  empty value for RESET). Apply with `SessionContext.with_updates` once the message
  succeeds.
* `proxy_only`: every statement of the message is such a ``guard.*`` setting: do not
  forward it; answer ``SET`` (CommandComplete) per statement and ReadyForQuery.
* `prepared`: SQL-level ``PREPARE`` / ``DEALLOCATE`` in the message: name -> the
  statement text to remember for judging ``EXECUTE name`` later; None: forget it
  (the name ``""`` with None: ``DEALLOCATE ALL``). Apply with
  `SessionContext.with_prepared` once the message succeeds.
* `reapply_settings`: the message contains RESET / RESET ALL / DISCARD ALL; they
  return settings to the session defaults, so the policy's settings must be *session
  defaults* of upstream connections (startup parameters, see
  `AgentPolicy.upstream_settings`), or the proxy re-applies them after the message.
* `cacheable`: False when the decision depends on a constant, the context or the
  session (settings, EXECUTE, row filters): never reuse it for another message of
  the same shape. The judge's own cache already honours this.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from .context import FrozenMap

SQLSTATE_INSUFFICIENT_PRIVILEGE = "42501"
SQLSTATE_SYNTAX_ERROR = "42601"
SQLSTATE_FEATURE_NOT_SUPPORTED = "0A000"
SQLSTATE_INVALID_STATEMENT_NAME = "26000"
SQLSTATE_INVALID_PARAMETER_VALUE = "22023"
SQLSTATE_INTERNAL_ERROR = "XX000"

Action = Literal["allow", "deny", "rewrite"]


@dataclass(frozen=True)
class Decision:
    action: Action
    rule: str  # e.g. "tables.customers.deny_columns"; "" when nothing applied
    reason: str  # LLM-readable sentence naming agent type, operation, object and rule
    hint: str  # what IS allowed
    sqlstate: str  # "" when allowed
    sql: str  # what to send upstream
    monitored: bool = False
    context_updates: Mapping[str, str] = field(default_factory=FrozenMap)
    cacheable: bool = True
    proxy_only: bool = False
    prepared: Mapping[str, str | None] = field(default_factory=lambda: MappingProxyType({}))
    reapply_settings: bool = False

    @property
    def allowed(self) -> bool:
        return self.action != "deny"
