"""Timeouts said the way denials are: which limit, whose, and what to do.

Postgres ends a statement that ran past ``statement_timeout`` with a bare
``canceling statement due to statement timeout``; an agent cannot tell the limit
from a fault, nor what to change. `explain_timeout(policy, fields)` takes the
fields of such an ErrorResponse (`codec.error_fields`: ``C`` the SQLSTATE, ``M`` the
message) and returns the message and hint the proxy should send instead, or None
when the error is not a timeout (forward it unchanged). The SQLSTATE stays
Postgres' own, so clients that retry on it still do.

===========  ===================================================  ======================
SQLSTATE     Postgres says                                        limit
===========  ===================================================  ======================
57014        canceling statement due to statement timeout         ``statement_timeout``
25P03        terminating connection due to idle-in-transaction     ``idle_in_transaction_
             timeout                                              timeout``
25P04        terminating connection due to transaction timeout    ``transaction_timeout``
55P03        canceling statement due to lock timeout              (the server's)
===========  ===================================================  ======================

``cause="transaction_timeout"``: the proxy itself cancelled the statement because
the transaction passed the policy's ``transaction_timeout`` (Postgres 15 and 16 have
no such setting), so the 57014 ``user request`` it gets back is that limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

from .agent import AgentPolicy, _fmt


def _limit(policy: AgentPolicy, value: timedelta | None, key: str, setting: str) -> str:
    if value is None:
        return f"the server's {setting} (not set by policy {policy.name})"
    return f"{_fmt(value)}, the {setting} of agent type {policy.name} (policy {policy.name}, timeouts.{key})"


def explain_timeout(
    policy: AgentPolicy, fields: Mapping[str, str], cause: str = ""
) -> tuple[str, str] | None:
    """(message, hint) for a timeout error, None for any other error."""
    code = fields.get("C", "")
    text = fields.get("M", "").lower()
    if cause == "transaction_timeout" or code == "25P04" or "transaction timeout" in text:
        limit = _limit(
            policy, policy.transaction_timeout, "transaction_timeout", "transaction_timeout"
        )
        return (
            f"the transaction was ended because it lasted longer than {limit}; it was rolled back",
            "keep transactions short: do the reading and thinking outside the transaction, then "
            "BEGIN, write, COMMIT; split a long batch into several transactions",
        )
    if code == "57014" and "statement timeout" in text:
        limit = _limit(policy, policy.statement_timeout, "statement_timeout", "statement_timeout")
        return (
            f"the statement was cancelled because it ran longer than {limit}; nothing it did remains",
            "make it cheaper: filter on an indexed column, add a LIMIT, join fewer tables, or split "
            "the work into smaller statements; an agent may lower statement_timeout, never raise it",
        )
    if code == "25P03" or "idle-in-transaction timeout" in text:
        limit = _limit(
            policy,
            policy.idle_in_transaction_timeout,
            "idle_in_transaction_timeout",
            "idle_in_transaction_session_timeout",
        )
        return (
            f"the session was closed because its transaction stayed idle longer than {limit}; "
            "the transaction was rolled back",
            "reconnect; do not keep a transaction open while waiting or thinking: COMMIT or "
            "ROLLBACK before the next step",
        )
    if code == "55P03" and "lock timeout" in text:
        return (
            "the statement was cancelled because it waited for a lock longer than the server's "
            "lock_timeout; nothing it did remains",
            "another session holds the rows or the table: retry a little later, and keep your own "
            "transactions short",
        )
    return None
