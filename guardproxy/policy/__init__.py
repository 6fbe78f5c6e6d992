"""Per-agent-type policies: YAML models, loader and the judging engine.

Public API:

* `load_policy_set(directory) -> PolicySet` (raises `PolicyError` listing every error)
* `PolicySet.match(agent_id) -> AgentPolicy | None`
* `Judge(policies, catalog=None).judge(policy, sql, ctx) -> Decision`
* `SessionContext`, `parse_context_comment(sql)`
* `Catalog` (re-exported from `guardproxy.analysis`)

Pure: no sockets, no database. The proxy enforces the time and connection limits
the policies declare (`AgentPolicy` docstring) and applies decisions (`Decision`).
"""

from __future__ import annotations

from ..analysis.catalog import Catalog
from .agent import AgentPolicy, FunctionRules, TableRule
from .context import FrozenMap, SessionContext, parse_context_comment
from .decision import Decision
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
    "TableRule",
    "load_policy_set",
    "parse_context_comment",
]
