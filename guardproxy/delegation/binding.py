"""How a client session uses delegation: pure helpers the relay calls (no sockets).

Per agent type, ``delegation`` in the policy (`mode()`) is ``off`` (today's declared
context), ``optional`` (a token is used when presented) or ``required``.

* A token arrives as the login password (`looks_like_token()` tells it from a
  password), as ``SET guard.token = '...'``, or as ``-c guard.token=...`` in the
  ``options`` startup parameter: `take_token()` takes it out of the context updates
  before anything else sees them, so it never becomes a context tag (tags reach audit
  rows and statement tags) and is never sent upstream.
* `check_context_updates()` refuses context keys that a token decides: principals and
  token id whenever a token is present or required, the task when the token names
  one, and any token in a SQL comment (comments are forwarded: a token there would
  land in Postgres' logs).
* `gate()` runs before every statement: a ``required`` type without a token is
  refused, and a token that expired or was revoked since it was presented too.
* `redact()` replaces any token in a statement's text before the text is audited or
  logged.
* `bind_context()` puts the token's principals and task into the session context
  (row filters' ``{principals}`` and ``{task}``), `effective_policy()` gives the policy
  narrowed by the token, for the judge.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace

from guardproxy.policy.agent import AgentPolicy
from guardproxy.policy.context import SessionContext
from guardproxy.policy.decision import SQLSTATE_INSUFFICIENT_PRIVILEGE
from guardproxy.protocol.errors import GuardError

from .claims import Delegation, fingerprint
from .errors import TokenError
from .narrowing import narrow_policy
from .verify import Verifier

TOKEN_KEY = "token"  # guard.token
_JWS = re.compile(r"^[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*$")
_PRESENT = "SET guard.token = '<token>', the password, or options=-c guard.token=<token>"


_TOKEN_TEXT = re.compile(r"eyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]*")


def redact(text: str) -> str:
    """`text` with every JWS in it replaced by ``<token FINGERPRINT>``: for statement
    texts that go to audit events and logs (``SET guard.token = '...'``, a denied
    message carrying one)."""
    if "eyJ" not in text:
        return text
    return _TOKEN_TEXT.sub(lambda m: f"<token {fingerprint(m.group(0))}>", text)


def mode(policy: AgentPolicy) -> str:
    """``off``, ``optional`` or ``required`` (the policy's ``delegation`` key)."""
    return policy.document.delegation


def looks_like_token(password: str) -> bool:
    """True for a JWS compact token (``eyJ...``), as opposed to a password."""
    return password.startswith("eyJ") and _JWS.match(password) is not None


def _key(raw: str) -> str:
    return raw.lower().removeprefix("guard.")


def take_token(updates: Mapping[str, str]) -> tuple[str | None, dict[str, str]]:
    """(the token in `updates`, the other updates). Call on ``Decision.context_updates``
    and on the startup parameters' guard.* context before applying them."""
    token = None
    rest: dict[str, str] = {}
    for raw, value in updates.items():
        if _key(raw) == TOKEN_KEY:
            token = value
        else:
            rest[raw] = value
    return token, rest


def check_context_updates(
    policy: AgentPolicy,
    updates: Mapping[str, str],
    delegation: Delegation | None,
    source: str,
) -> None:
    """Raises GuardError (42501) for context keys the token decides (module docstring).

    `source` is ``SET``, ``comment`` or ``startup``; `updates` as the judge or
    `parse_context_comment` return them (``guard.`` prefix or not).
    """
    keys = {_key(raw) for raw in updates}
    if source == "comment" and TOKEN_KEY in keys:
        raise GuardError(
            "a delegation token in a SQL comment is refused: comments are sent to Postgres "
            "and would put the token in its logs",
            hint=f"present it with {_PRESENT}",
            sqlstate=SQLSTATE_INSUFFICIENT_PRIVILEGE,
        )
    delegated = delegation is not None or mode(policy) == "required"
    if not delegated:
        return
    decided = {"principals", "token_id"}
    if delegation is not None and delegation.task is not None:
        decided.add("task")
    clash = sorted(keys & decided)
    if clash:
        where = "the session's delegation token" if delegation else "a delegation token"
        raise GuardError(
            f"guard.{clash[0]} comes from {where} for agent type {policy.name} "
            f"(delegation: {mode(policy)}); it cannot be set with {source}",
            hint="to act for other principals, present a token minted for them: " + _PRESENT,
            sqlstate=SQLSTATE_INSUFFICIENT_PRIVILEGE,
        )


def present(
    policy: AgentPolicy, verifier: Verifier | None, token: str, agent_id: str, now: float
) -> Delegation:
    """Verifies a token an agent presents (login, SET guard.token, options)."""
    if mode(policy) == "off":
        raise TokenError(
            "issuer",
            f"agent type {policy.name} does not take delegation tokens (delegation: off)",
            hint="the operator sets delegation: optional or required in its policy",
        )
    if verifier is None or not verifier.issuers:
        raise TokenError(
            "issuer",
            "delegation tokens cannot be checked: no issuer is configured (delegation_issuers)",
        )
    return verifier.verify(token, agent_id, now)


def gate(
    policy: AgentPolicy, delegation: Delegation | None, verifier: Verifier | None, now: float
) -> None:
    """Before every statement: a token is there if required, and still valid."""
    if delegation is None:
        if mode(policy) == "required":
            raise TokenError(
                "missing",
                f"agent type {policy.name} needs a delegation token (delegation: required): "
                "no statement runs without one",
                hint=f"present a token minted for this agent: {_PRESENT}",
            )
        return
    if verifier is None:
        raise TokenError("keys", "delegation tokens cannot be checked: no issuer is configured")
    verifier.check(delegation, now)


def bind_context(ctx: SessionContext, delegation: Delegation) -> SessionContext:
    """The context with the token's principals, and its task when it names one."""
    task = delegation.task if delegation.task is not None else ctx.task
    return replace(ctx, principals=delegation.principals, task=task)


def effective_policy(policy: AgentPolicy, delegation: Delegation | None) -> AgentPolicy:
    """The policy the judge applies to this session's statements."""
    return narrow_policy(policy, delegation.narrowing if delegation is not None else None)
