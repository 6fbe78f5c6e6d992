"""Policy features for schemas of one's own (no database): row filters per operation
and the insert check, the notice of a filter without principals, table globs, hints
that propose only what the policy allows, and timeouts said like denials."""

from __future__ import annotations

from pathlib import Path

import docexamples as dx
import pglast
import pytest

from guardproxy.onboarding.schema import DbSchema
from guardproxy.policy import (
    Decision,
    Judge,
    PolicyError,
    PolicySet,
    SessionContext,
    load_policy_set,
)
from guardproxy.policy.timeouts import explain_timeout

ROOT = Path(__file__).resolve().parents[2]
HELPDESK = DbSchema.from_ddl(
    (ROOT / "sql" / "helpdesk_schema.sql").read_text()
    + "ALTER TABLE tickets ADD COLUMN deleted_at timestamptz, ADD COLUMN deleted_by text,"
    " ADD COLUMN delete_reason text;"
)

SUPPORT = """
agents: ["support-*"]
upstream_role: guard_support
statements: [read, write]
timeouts:
  statement_timeout: 10s
tables:
  organizations:
    ops: [select]
  tickets:
    ops: [select, update, delete]
    update_columns: [status, priority]
    soft_delete: true
  comments:
    ops: [select, insert]
    insert_columns: [ticket_id, author_id, body]
    append_only: true
  refunds:
    ops: [select]
    append_only: true
row_filters:
  tickets:
    select: "organization_id = ANY({principals})"
    delete: "status = 'spam'"
  comments:
    insert: "ticket_id IN (SELECT id FROM tickets WHERE organization_id = ANY({principals}))"
"""


def load(tmp_path: Path, text: str, name: str = "support") -> PolicySet:
    directory = tmp_path / "policies"
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.yaml").write_text(text)
    return load_policy_set(directory)


def decide(policies: PolicySet, sql: str, principals: tuple[str, ...] = ("1",)) -> Decision:
    policy = policies.match("support-1") or policies.match("reporter-1")
    assert policy is not None
    ctx = SessionContext(agent_id="support-1", principals=principals)
    return Judge(policies, HELPDESK.catalog()).judge(policy, sql, ctx)


@pytest.fixture
def support(tmp_path: Path) -> PolicySet:
    return load(tmp_path, SUPPORT)


# ---------------------------------------------------------------- per operation


def test_a_read_gets_the_select_condition_and_a_delete_also_its_own(support: PolicySet) -> None:
    read = decide(support, "SELECT id FROM tickets WHERE status = 'open'")
    assert read.action == "rewrite" and read.rule == "row_filters.tickets"
    assert "organization_id = ANY('{\"1\"}')" in read.sql and "status = 'spam'" not in read.sql

    delete = decide(support, "DELETE FROM tickets WHERE id = 3")
    assert delete.rule == "row_filters.tickets.delete"
    where = delete.sql.split("WHERE", 1)[1]
    # only rows it can see, marked spam, not deleted yet: all three, ANDed
    for term in ("organization_id = ANY('{\"1\"}')", "status = 'spam'", "deleted_at IS NULL"):
        assert term in where, delete.sql
    assert delete.write is not None and delete.write.soft_delete  # still a soft delete

    update = decide(support, "UPDATE tickets SET status = 'solved' WHERE id = 1")
    assert "organization_id = ANY('{\"1\"}')" in update.sql and "'spam'" not in update.sql


def test_an_insert_is_checked_row_by_row_and_keeps_its_answer(support: PolicySet) -> None:
    sql = "INSERT INTO comments (ticket_id, author_id, body) VALUES (2, 1, 'x'), (4, $1, $2) RETURNING id"
    decision = decide(support, sql)
    assert decision.action == "rewrite" and decision.rule == "row_filters.comments.insert"
    rewritten = decision.sql
    pglast.parse_sql(rewritten)
    assert rewritten.startswith("INSERT INTO comments (ticket_id, author_id, body) SELECT ")
    assert rewritten.endswith("RETURNING id")  # the agent's answer is unchanged
    assert "guardproxy.check_insert(" in rewritten and "UNION ALL SELECT 4, $1, $2" in rewritten
    assert "(CAST(NULL AS public.comments)).ticket_id" in rewritten  # the table's types
    assert "row_filters.comments.insert" in rewritten  # the error the database raises names it


@pytest.mark.parametrize(
    "sql, why",
    [
        ("INSERT INTO comments (ticket_id, body) VALUES (1, DEFAULT)", "DEFAULT in the VALUES"),
        (
            "INSERT INTO comments (ticket_id, body) VALUES "
            + ", ".join(f"({i}, 'x')" for i in range(101)),
            "at most 100 rows",
        ),
    ],
)
def test_inserts_that_cannot_be_checked_are_denied(support: PolicySet, sql: str, why: str) -> None:
    decision = decide(support, sql)
    assert decision.action == "deny" and why in decision.reason
    assert decision.rule == "row_filters.comments"
    # the hint proposes only what support may do with comments (insert, select)
    assert "UPDATE" not in decision.hint and "insert, select" in decision.hint


def test_default_values_cannot_be_checked(tmp_path: Path) -> None:
    policies = load(
        tmp_path, SUPPORT.replace("    insert_columns: [ticket_id, author_id, body]\n", "")
    )
    decision = decide(policies, "INSERT INTO comments DEFAULT VALUES")
    assert decision.action == "deny" and "DEFAULT VALUES" in decision.reason
    every = decide(policies, "INSERT INTO comments VALUES (9, 2, 1, 'x', now())")
    assert every.action == "rewrite"  # no column list: the catalog's columns, in order
    assert "INSERT INTO comments (id, ticket_id, author_id, body, created_at) SELECT" in every.sql


def test_a_filtered_table_without_an_insert_condition_refuses_inserts(tmp_path: Path) -> None:
    policies = load(
        tmp_path,
        SUPPORT.replace("ops: [select, update, delete]", "ops: [select, insert, update, delete]"),
    )
    decision = decide(
        policies, "INSERT INTO tickets (organization_id, requester_id, subject) VALUES (1, 1, 'x')"
    )
    assert decision.action == "deny" and "not possible with its row filter" in decision.reason


def test_reads_of_a_table_with_only_an_insert_condition_are_not_rewritten(
    support: PolicySet,
) -> None:
    decision = decide(support, "SELECT id, body FROM comments WHERE ticket_id = 1")
    assert (
        decision.action == "allow"
        and decision.sql == "SELECT id, body FROM comments WHERE ticket_id = 1"
    )


def test_per_operation_conditions_are_checked_when_loading(tmp_path: Path) -> None:
    text = SUPPORT.replace(
        "    delete: \"status = 'spam'\"", '    delete: "status = \'spam\'"\n    insert: "true"'
    )
    with pytest.raises(PolicyError) as caught:
        load(tmp_path, text)
    assert any(
        "row_filters.tickets.insert: is set but tables.tickets.ops does not include 'insert'" in e
        for e in caught.value.errors
    ), caught.value.errors
    with pytest.raises(PolicyError) as caught:
        load(tmp_path, SUPPORT.replace("status = 'spam'", "status = $1"))
    assert any(
        "row_filters.tickets.delete" in e and "placeholders" in e for e in caught.value.errors
    )
    with pytest.raises(PolicyError) as caught:
        load(
            tmp_path,
            SUPPORT.replace(
                '    select: "organization_id = ANY({principals})"\n    delete: "status = \'spam\'"\n',
                "    selekt: x\n",
            ),
        )
    assert any("row_filters.tickets" in e for e in caught.value.errors), caught.value.errors


def test_check_summarises_each_condition(support: PolicySet) -> None:
    summary = support.get("support").summary()  # type: ignore[union-attr]
    assert "  row filter tickets, select: organization_id = ANY({principals})" in summary
    assert (
        "  row filter tickets, delete: (organization_id = ANY({principals})) AND (status = 'spam')"
        in summary
    )
    assert "  row filter comments, insert: ticket_id IN" in summary


# ---------------------------------------------------------------- no principals


def test_a_principals_filter_without_principals_says_so(support: PolicySet) -> None:
    decision = decide(support, "SELECT id FROM tickets", principals=())
    assert decision.action == "rewrite"
    assert len(decision.notices) == 1
    notice = decision.notices[0]
    assert "row filter of tickets" in notice and "has none" in notice
    assert "SET guard.principals" in notice and "row_filters.tickets" in notice
    assert decide(support, "SELECT id FROM tickets", principals=("1",)).notices == ()
    # a statement that does not touch the filtered table says nothing
    assert decide(support, "SELECT id FROM organizations", principals=()).notices == ()


def test_the_notice_follows_a_templated_read(support: PolicySet) -> None:
    policy = support.get("support")
    assert policy is not None
    judge = Judge(support, HELPDESK.catalog())
    empty = SessionContext(agent_id="support-1")
    first = judge.judge(policy, "SELECT id FROM tickets WHERE id = 1", empty)
    second = judge.judge(policy, "SELECT id FROM tickets WHERE id = 2", empty)
    assert first.notices and second.notices == first.notices
    assert "id = 2" in second.sql
    with_principals = judge.judge(
        policy,
        "SELECT id FROM tickets WHERE id = 3",
        SessionContext("support-1", principals=("1",)),
    )
    assert with_principals.notices == ()


# ---------------------------------------------------------------- globs


GLOBS = """
agents: ["reporter-*"]
upstream_role: guard_reporter
tables:
  "*":
    ops: [select]
    deny_columns: [email]
  users:
    ops: [select]
    columns: [id, display_name]
  "audit_*":
    ops: [select]
"""


def test_a_glob_covers_tables_and_an_exact_entry_overrides_it(tmp_path: Path) -> None:
    policies = load(tmp_path, GLOBS, "reporter")
    policy = policies.get("reporter")
    assert policy is not None
    catalog = HELPDESK.catalog()
    judge = Judge(policies, catalog)
    ctx = SessionContext(agent_id="reporter-1")
    assert judge.judge(policy, "SELECT subject FROM tickets", ctx).action == "allow"
    exact = judge.judge(policy, "SELECT phone FROM users", ctx)
    assert exact.action == "deny" and exact.rule == "tables.users.columns"
    write = judge.judge(policy, "DELETE FROM tickets WHERE id = 1", ctx)
    assert write.action == "deny"
    glob_rule = policy.tables[0]
    covered = policy.glob_matches(glob_rule, catalog)
    assert ("public", "tickets") in covered and ("public", "users") not in covered


def test_a_glob_never_covers_the_catalogs_nor_guardproxys_schema(tmp_path: Path) -> None:
    policies = load(tmp_path, GLOBS.replace('"*":', '"*.*":'), "reporter")
    policy = policies.get("reporter")
    assert policy is not None
    judge = Judge(policies, HELPDESK.catalog())
    ctx = SessionContext(agent_id="reporter-1")
    secret = judge.judge(policy, "SELECT * FROM pg_catalog.pg_authid", ctx)
    assert secret.action == "deny" and secret.rule == "catalogs"
    own = judge.judge(policy, "SELECT * FROM guardproxy.audit_events", ctx)
    assert own.action == "deny" and own.rule == "guardproxy_schema"


@pytest.mark.parametrize("key", ["Reporting.*", "a.b.*", "audit_*;drop", '"x"*'])
def test_malformed_globs_are_errors(tmp_path: Path, key: str) -> None:
    with pytest.raises(PolicyError) as caught:
        load(
            tmp_path,
            f'agents: ["r-*"]\nupstream_role: r\ntables:\n  {key!r}:\n    ops: [select]\n',
            "r",
        )
    assert any("glob such as reporting.*" in e for e in caught.value.errors), caught.value.errors


# ---------------------------------------------------------------- hints and timeouts


def test_hints_propose_only_what_the_policy_allows(tmp_path: Path, support: PolicySet) -> None:
    read_only_append = decide(support, "DELETE FROM refunds WHERE id = 1")
    assert read_only_append.rule == "tables.refunds.append_only"
    assert "insert" not in read_only_append.hint.lower().replace("append-only", "")
    truncate = decide(
        support,
        "MERGE INTO tickets t USING organizations o ON t.organization_id = o.id WHEN MATCHED THEN DO NOTHING",
    )
    assert truncate.action == "deny"
    assert "INSERT" not in truncate.hint  # support may not insert into tickets
    assert "DELETE FROM tickets" in truncate.hint or "UPDATE" in truncate.hint


def test_a_statement_timeout_names_the_limit_and_what_to_do(support: PolicySet) -> None:
    policy = support.get("support")
    assert policy is not None
    message, hint = explain_timeout(
        policy, {"C": "57014", "M": "canceling statement due to statement timeout"}
    ) or ("", "")
    shown = [
        line
        for line in dx.block_starting("policies.md", "ERROR:  the statement was cancelled").body
    ]
    assert shown[0].removeprefix("ERROR:").strip() == message
    assert shown[1].removeprefix("HINT:").strip() == hint
    assert "10s" in message and "timeouts.statement_timeout" in message


def test_other_timeouts_and_other_errors(support: PolicySet) -> None:
    policy = support.get("support")
    assert policy is not None
    idle = explain_timeout(
        policy, {"C": "25P03", "M": "terminating connection due to idle-in-transaction timeout"}
    )
    assert idle is not None and "not set by policy support" in idle[0]
    proxy_cut = explain_timeout(
        policy,
        {"C": "57014", "M": "canceling statement due to user request"},
        cause="transaction_timeout",
    )
    assert proxy_cut is not None and "transaction_timeout" in proxy_cut[0]
    assert (
        explain_timeout(policy, {"C": "57014", "M": "canceling statement due to user request"})
        is None
    )
    assert explain_timeout(policy, {"C": "23505", "M": "duplicate key value"}) is None
