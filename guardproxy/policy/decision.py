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
  session (settings, EXECUTE, row filters, soft deletes): never reuse it for another
  message of the same shape. The judge's own cache already honours this (and
  re-applies the one rewrite it caches, the row cap LIMIT, to each message's text).

Write safety (docs/policies.md, "Write safety"; what the runtime does with each):

* `write`: set for every message that writes rows (INSERT, UPDATE, DELETE, MERGE,
  TRUNCATE, COPY FROM, writable CTEs, EXPLAIN ANALYZE of a write, EXECUTE of a
  prepared write); None for messages that write no rows. A summary over the
  message's statements; `writes` has one entry per statement (None for the
  statements that write nothing), in order, so that the runtime can match each
  CommandComplete of a multi-statement message to its statement. See `WriteEffects`.
* `max_rows_returned`: set when the policy caps the rows of reads and the message
  holds a statement that returns query rows (SELECT / VALUES / TABLE, FETCH,
  EXECUTE of a read, COPY ... TO). The judge already rewrote each such query to
  ``LIMIT`` at most N + 1 (cursors: the query of ``DECLARE``), so the server stops
  early; the runtime counts the DataRows (CopyData for COPY; per cursor across
  FETCHes) of each result and, past N, does what `rows_over_cap` says: ``truncate``
  (send the first N rows, then the CommandComplete retagged ``SELECT N`` and a
  WARNING ``result truncated to N rows by policy``) or ``error`` (an ErrorResponse
  54000 naming the cap, no rows). None: no cap (also in monitor mode).
* `max_bytes_returned`: set (enforce mode) on every allowed message of an agent type
  whose policy has ``limits.max_bytes_returned``: a bound on the bytes of row data
  that leave for the client, so that one huge row (``json_agg`` of a whole table)
  is bounded too. The runtime adds up the payload lengths of the DataRow messages
  (CopyData for COPY ... TO) of each result (a statement's result; the RETURNING
  rows of a write; per cursor across its FETCHes, see `cursor`) and, past the cap,
  does what `rows_over_cap` says: ``truncate`` (stop forwarding rows before the one
  that would pass the cap, CommandComplete retagged with the rows sent, a WARNING
  ``result truncated to N bytes by policy``) or ``error`` (ErrorResponse 54000).
  None: no byte cap (also in monitor mode).
* `plan_check`: the policy limits plan estimates (``max_plan_cost`` / ``max_plan_rows``)
  and the message holds a read to estimate (SELECT, DECLARE CURSOR, EXECUTE of a
  read): see `guardproxy.policy.plans` for the EXPLAIN and the check, before the
  message runs. False in monitor mode.
* `cursor`: with a row or byte cap, a message that is one ``FETCH`` (``("fetch", name)``) or one
  ``DECLARE`` (``("declare", name)``): the runtime counts the rows a cursor delivered
  over all its FETCHes and cuts at N in total, not per FETCH.
* `notices`: messages the client should get as NoticeResponses (severity NOTICE,
  SQLSTATE 01000) before the statement's answer, e.g. that a row filter using
  ``{principals}`` ran in a session without principals and matches no rows.
* `cursors`: the same per statement of the message, in order (None for a statement
  that is neither), for messages of several statements (``FETCH 600 FROM c; FETCH
  600 FROM c``: without it, each result would be capped on its own and the cursor
  could deliver N + 1 rows in total); empty when no statement is one.
* `shape`: the normalized text of the message (literals as ``$n``, edge comments
  removed), the cache key; "" when it does not parse. For caching plan estimates by
  shape. Derived idempotency keys must not be built from it alone (two statements
  that differ only in a literal share it): use `policy.idempotency.derive_key`.
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
RowsOverCap = Literal["truncate", "error"]


@dataclass(frozen=True)
class WriteEffects:
    """What one statement (or, in `Decision.write`, one message) writes, for the runtime.

    * `operation`: ``insert``, ``update``, ``delete``, ``merge``, ``copy`` or
      ``truncate``: the root write as the agent wrote it (for a read whose writable
      CTEs write, the first CTE's; for EXPLAIN ANALYZE, the explained statement's).
    * `tables`: every table written, ``schema.table`` (each part quoted as an
      identifier when it needs it, so it is valid ``regclass`` input).
    * `soft_delete` / `captured`: the judge rewrote the agent's DELETE (the root
      statement, or the statement of a prepared EXECUTE) into the writable-CTE form
      that soft-deletes (UPDATE) or hard-deletes and captures the row images into
      ``guardproxy.deleted_rows``. The server answers it like a SELECT (RowDescription,
      one DataRow per deleted row, ``SELECT n``): the runtime sends the client
      ``DELETE n`` instead, and drops the RowDescription and DataRows unless
      `soft_delete_returning` (in the extended protocol Describe must answer NoData
      then). A soft-deleting or capturing DELETE inside a WITH query or under EXPLAIN
      is rewritten too but leaves these False: its statement's answer is the agent's.
    * `soft_delete_returning`: the agent's DELETE had a RETURNING list: the rewritten
      statement's rows are exactly the client's rows (for a soft delete the row as
      soft-deleted: deleted_at, deleted_by and the reason are set).
    * `max_rows_affected`, `cap_rule`: the smallest row cap of the tables written
      (``tables.<t>.max_rows_affected``, else ``limits.max_rows_affected``). The
      runtime runs the statement in a transaction or savepoint of its own, reads the
      count of its CommandComplete and undoes it past the cap. The judge denies the
      writes whose rows that count does not show (writes in WITH queries under
      another statement, EXPLAIN ANALYZE of a write, TRUNCATE) when a cap, or a
      ``budgets.max_writes_per_task``, applies to them.
    """

    operation: str
    tables: tuple[str, ...]
    soft_delete: bool = False
    soft_delete_returning: bool = False
    max_rows_affected: int | None = None
    cap_rule: str = ""
    captured: bool = False


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
    # guard.* keys a RESET puts back to their value at login ("*": all of them, for
    # RESET ALL and DISCARD ALL), and the keys a SET LOCAL changed (until the end of
    # the transaction)
    context_resets: frozenset[str] = frozenset()
    context_local: frozenset[str] = frozenset()
    cacheable: bool = True
    proxy_only: bool = False
    prepared: Mapping[str, str | None] = field(default_factory=lambda: MappingProxyType({}))
    reapply_settings: bool = False
    write: WriteEffects | None = None
    writes: tuple[WriteEffects | None, ...] = ()
    max_rows_returned: int | None = None
    rows_over_cap: RowsOverCap = "truncate"
    max_bytes_returned: int | None = None
    shape: str = ""
    plan_check: bool = False
    cursor: tuple[str, str] | None = None  # ("fetch" | "declare", name) of a capped cursor
    notices: tuple[str, ...] = ()  # NoticeResponses (severity NOTICE, 01000) to send first
    cursors: tuple[tuple[str, str] | None, ...] = ()  # per statement, for several

    @property
    def allowed(self) -> bool:
        return self.action != "deny"
