"""Verified delegation tokens: which agent, on behalf of whom, for what, until when.

An orchestrating application mints a signed JWT for one agent run; the agent presents
it to guardproxy, which verifies it and from then on knows, rather than is told, the
principals and task of the session (docs/delegation.md).

Public API, by module:

* `verify`: ``Verifier(issuers, clock_skew, revocations)`` /
  ``Verifier.from_settings(settings, revocations)``; ``.verify(token, agent_id, now)
  -> Delegation`` (raises `TokenError`, SQLSTATE 28000), ``.check(delegation, now)``
  before each statement, ``.key_problems()`` at start and reload.
* `claims`: `Delegation` (principals, task, token_id, issuer, expires_at, narrowing,
  fingerprint), `Narrowing`.
* `narrowing`: ``narrow_policy(policy, narrowing) -> AgentPolicy`` (never wider),
  ``narrowing_notes(policy, narrowing)``.
* `binding`: what a client session calls: ``mode``, ``looks_like_token``,
  ``take_token``, ``check_context_updates``, ``present``, ``gate``, ``bind_context``,
  ``effective_policy``.
* `postgres`: ``settings_sql(delegation)`` (``guard.principals``, ``guard.task``,
  ``guard.token_id`` for row-level security), ``rls_policy_sql(...)``.
* `revocations`: ``RevocationStore(dsn)`` (guardproxy.token_revocations),
  ``RevocationCache(store, refresh, clock_skew)``.
* `console`: ``parse(sql)`` / ``run(command, store, cache, by, delegations)`` for the
  admin console's REVOKE TOKEN, SHOW TOKENS, SHOW REVOCATIONS.
* `mint`: minting for development and tests; `commands`: the ``guardproxy token`` CLI.

Nothing is imported here, so that the CLI can load the ``token`` commands cheaply;
import from the modules. Pure modules (claims, narrowing, binding, postgres, mint, console's parsing) hold no
sockets; revocations.py is the only one that talks to the database.
"""
