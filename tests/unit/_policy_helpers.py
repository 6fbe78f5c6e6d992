"""Shared helpers for the analysis / policy unit tests (no database)."""

from __future__ import annotations

import shutil
from functools import cache
from pathlib import Path

import pglast

from guardproxy.analysis import Catalog
from guardproxy.policy import Decision, Judge, PolicySet, SessionContext, load_policy_set

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"
SCHEMA = ROOT / "sql" / "example_schema.sql"
AGENTS = {"analytics": "analytics-7", "support": "support-3", "fulfillment": "fulfillment-2"}


@cache
def example_policies() -> PolicySet:
    return load_policy_set(POLICIES)


@cache
def example_catalog() -> Catalog:
    return Catalog.from_ddl(SCHEMA.read_text())


def judge(
    agent_type: str,
    sql: str,
    *,
    catalog: bool = True,
    ctx: SessionContext | None = None,
    policies: PolicySet | None = None,
) -> Decision:
    """One decision by a fresh Judge (no cache effects between tests)."""
    policy_set = policies or example_policies()
    agent = AGENTS.get(agent_type, agent_type)
    policy = policy_set.match(agent)
    assert policy is not None, agent
    engine = Judge(policy_set, example_catalog() if catalog else None)
    return engine.judge(policy, sql, ctx or SessionContext(agent_id=agent))


def copy_policies(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    return target


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


def assert_passes(decision: Decision, sql: str) -> None:
    """The statement goes through: unchanged, or changed only by write safety (the row
    cap ``LIMIT n + 1`` of analytics, the soft-delete filters and rewrites of support's
    orders, the check of the orders support's order_state_log rows refer to) into SQL
    that parses."""
    assert decision.action in ("allow", "rewrite"), (sql, decision)
    assert not decision.monitored, (sql, decision)
    if decision.action == "allow":
        assert decision.sql == sql, (sql, decision)
        return
    assert decision.rule == "limits.max_rows_returned" or decision.rule.endswith(
        (".soft_delete", ".soft_deleted_parents")
    ), (sql, decision)
    pglast.parse_sql(decision.sql)
    if decision.rule == "limits.max_rows_returned" and decision.cacheable:
        # the cached form of the cap: the agent's text with LIMIT n + 1 appended
        assert decision.sql.replace("\nLIMIT 1001", "") == sql, (sql, decision.sql)
