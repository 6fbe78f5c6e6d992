"""Per-agent-type policies: YAML models, loader and the judging engine.

Public API:

* `load_policy_set(directory) -> PolicySet` (raises `PolicyError` listing every error)
* `PolicySet.match(agent_id) -> AgentPolicy | None`
* `Judge(policies, catalog=None)`: `.judge(policy, sql, ctx) -> Decision`,
  `.judge_startup(policy, params) -> Decision`, `.set_catalog(catalog)`
* `SessionContext`, `parse_context_comment(sql)`
* `Catalog` (re-exported from `guardproxy.analysis`; `CATALOG_QUERY` fills it, primary
  keys included)
* `Decision`, `WriteEffects`: what to do with a message, and what it writes
* `tools`: `check_report`, `explain`, `roles_sql`, `soft_delete_sql` for the CLI
* `idempotency.idempotency_key` / `derive_key`: the key of a write;
  `plans.explain_statements` / `plan_estimate` / `plan_violation`: plan limits

Pure: no sockets, no database. What the proxy does with it, per client session:

1. At startup: ``policy = policies.match(user)`` (None: refuse the login);
   ``judge.judge_startup(policy, startup_params)`` (deny: refuse the login; apply
   ``context_updates``). Connect upstream as ``policy.upstream_role`` with
   ``policy.upstream_settings(server_version_num)`` as startup parameters, so that
   RESET / RESET ALL / DISCARD ALL return to the policy's settings; never forward
   the client's ``options``. Keep ``standard_conforming_strings`` on upstream.
2. Per Query message and per Parse: ``ctx = ctx.with_updates(parse_context_comment(sql))``
   when the text holds ``/*``, then ``decision = judge.judge(policy, sql, ctx)``:

   * ``deny``: ErrorResponse (`sqlstate`, `reason`, HINT `hint`), nothing upstream;
     inside a transaction block leave it failed, as a server error would.
   * ``allow`` / ``rewrite``: send ``decision.sql`` (a Parse keeps its decision for
     every Bind / Execute of that statement).
   * ``proxy_only``: the message is only ``SET guard.* / RESET guard.*``: answer
     ``SET`` per statement yourself, forward nothing.
   * after success: ``ctx = ctx.with_updates(decision.context_updates)`` and, for each
     ``name, sql in decision.prepared.items()``, ``ctx = ctx.with_prepared(name, sql)``.
   * ``reapply_settings``: nothing to do when the settings are startup parameters.
   * ``monitored``: log and count (rule, reason); the statement runs.
   * ``write`` / ``writes`` (`WriteEffects`): the message writes rows: run it as a
     managed write (row cap, soft-delete retag, idempotency key, task budgets);
     ``max_rows_returned`` / ``max_bytes_returned`` / ``rows_over_cap``: cut results
     (rows of reads; bytes of any result); ``plan_check``: check the
     plan estimate first (see `Decision`).
3. Enforce what the judge only exposes: ``transaction_timeout``, ``max_task_duration``,
   ``max_server_connections``, ``max_client_sessions``, ``idempotency_mode`` /
   ``idempotency_ttl``, ``max_writes_per_task`` / ``max_statements_per_task``,
   ``audit_on_loss`` (`AgentPolicy`).
4. On DDL and on reload: rebuild the `Catalog` and call ``judge.set_catalog``; on a
   new policy set build a new `Judge`.
"""

from __future__ import annotations

from ..analysis.catalog import Catalog
from .agent import AgentPolicy, FunctionRules, SoftDelete, TableRule
from .context import FrozenMap, SessionContext, parse_context_comment
from .decision import Decision, WriteEffects
from .engine import Judge
from .errors import PolicyError
from .loader import PolicySet, load_policy_set
from .models import PolicyDocument

__all__ = [
    "AgentPolicy",
    "Catalog",
    "Decision",
    "FrozenMap",
    "FunctionRules",
    "Judge",
    "PolicyDocument",
    "PolicyError",
    "PolicySet",
    "SessionContext",
    "SoftDelete",
    "TableRule",
    "WriteEffects",
    "load_policy_set",
    "parse_context_comment",
]
