"""Rewritten reads served from a template (guardproxy/policy/templates.py): the output is
the full rewrite of each statement, filters hold for every context, and whatever could
make the two differ is judged in full (no database)."""

from __future__ import annotations

import json

import pglast
import pytest
from _policy_helpers import copy_policies, example_catalog, example_policies

from guardproxy.policy import Decision, Judge, PolicySet, SessionContext, load_policy_set
from guardproxy.policy.templates import Template, constants, first_new_parameter, tokens

_POSITIONS = frozenset(("location", "stmt_location", "stmt_len"))  # and any *_start, *_end
ROW_FILTERS = """row_filters:
  customers: "id = ANY({principals})"
  order_state_log: "changed_by = {task} OR reason = {tag.mail}"
"""


@pytest.fixture(scope="module")
def filtered() -> PolicySet:
    import tempfile
    from pathlib import Path

    directory = copy_policies(Path(tempfile.mkdtemp(prefix="templates-")))
    path = directory / "support.yaml"
    path.write_text(path.read_text() + ROW_FILTERS)
    return load_policy_set(directory)


def _tree(sql: str) -> object:
    """The parse tree without token locations: equal trees mean equal statements."""

    def strip(node: object) -> object:
        if isinstance(node, dict):
            return {
                k: strip(v)
                for k, v in node.items()
                if k not in _POSITIONS and not k.endswith(("_start", "_end"))
            }
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return strip(json.loads(pglast.parser.parse_sql_json(sql)))


def _judges(policies: PolicySet, agent: str) -> tuple[Judge, Judge, object]:
    policy = policies.match(agent)
    assert policy is not None
    return Judge(policies, example_catalog()), Judge(policies, example_catalog()), policy


def _full(judge: Judge, policy: object, sql: str, ctx: SessionContext) -> Decision:
    judge._templates.clear()  # every statement judged and rewritten from scratch
    judge._valued.clear()
    return judge.judge(policy, sql, ctx)  # type: ignore[arg-type]


READS = [
    "SELECT o.id, o.fulfillment_status FROM orders o JOIN customers c ON c.id = o.customer_id "
    "WHERE o.customer_id = {n}",
    "SELECT * FROM orders WHERE id = {n} AND tracking_number = 'x{n}''s' "
    "AND requires_signature = true /* task='t{n}' */",
    "SELECT count(*) FROM orders WHERE id > -{n} AND shipped_at > now() - interval '{n} days'",
    "SELECT id FROM orders WHERE id IN ({n}, {n} + 1, -2.5e3) ORDER BY 1 OFFSET {n}",
    "select id from orders where customer_id = $1 and id > {n}",
    "SELECT id FROM orders WHERE tracking_number = E'a\\\\{n}' OR tracking_number IS NULL; "
    "SELECT {n}",
]


@pytest.mark.parametrize("template", READS)
def test_a_template_gives_each_statement_its_own_full_rewrite(template: str) -> None:
    cached, full, policy = _judges(example_policies(), "support-3")
    ctx = SessionContext(agent_id="support-3")
    for n in (1, 22, 333, 4444):
        sql = template.format(n=n)
        hits = cached.hits
        decision = cached.judge(policy, sql, ctx)  # type: ignore[arg-type]
        if n > 1:
            assert cached.hits == hits + 1, "a later statement of the shape is a template hit"
        expected = _full(full, policy, sql, ctx)
        assert decision.action == expected.action == "rewrite"
        assert decision.rule == expected.rule == "tables.orders.soft_delete"
        assert "deleted_at IS NULL" in decision.sql
        assert _tree(decision.sql) == _tree(expected.sql), (decision.sql, expected.sql)


def test_row_filters_hold_for_each_context_not_the_first_one(filtered: PolicySet) -> None:
    cached, full, policy = _judges(filtered, "support-3")
    for principals in (("1", "2"), ("7",), ("1", "2"), ()):
        ctx = SessionContext(agent_id="support-3", principals=principals)
        for n in (5, 6):
            sql = f"SELECT name FROM customers WHERE name <> 'x{n}'"
            decision = cached.judge(policy, sql, ctx)  # type: ignore[arg-type]
            expected = _full(full, policy, sql, ctx)
            assert decision.rule == "row_filters.customers"
            assert _tree(decision.sql) == _tree(expected.sql), (principals, decision.sql)
            wanted = "{" + ",".join(f'"{p}"' for p in principals) + "}"
            assert f"ANY('{wanted}')" in decision.sql, decision.sql


@pytest.mark.parametrize(
    "first, then",
    [
        ({"task": "None"}, {}),  # no task is not the task named 'None'
        ({"step": "None"}, {"task": "None"}),
        ({"tags": {"mail": "x=y"}}, {"tags": {"mail=x": "y"}}),  # '=' in a tag's key
        ({"task": "T-1"}, {"task": "T-2"}),
    ],
)
def test_contexts_never_share_a_template_with_other_filter_values(
    filtered: PolicySet, first: dict[str, object], then: dict[str, object]
) -> None:
    """A template carries the filter values it was printed with: only a context with
    the very same values may take it (a leak of the first context's rows otherwise)."""
    cached, full, policy = _judges(filtered, "support-3")
    for n, fields in enumerate((first, then, first, then)):
        ctx = SessionContext(agent_id="support-3", **fields)  # type: ignore[arg-type]
        sql = f"SELECT new_status FROM order_state_log WHERE id > {n}"
        decision = cached.judge(policy, sql, ctx)  # type: ignore[arg-type]
        expected = _full(full, policy, sql, ctx)
        assert decision.rule == "row_filters.order_state_log"
        assert _tree(decision.sql) == _tree(expected.sql), (fields, decision.sql, expected.sql)
    assert [t for t in cached._templates.values() if t is not None], "templates were used"


def test_reads_capped_by_max_rows_returned_are_never_templated() -> None:
    """The row cap keeps or replaces a LIMIT by its value: a template would carry the
    first statement's choice to every later one."""
    cached, full, policy = _judges(example_policies(), "analytics-7")
    ctx = SessionContext(agent_id="analytics-7")
    for limit in (5, 50000, 7):
        sql = f"SELECT id, customer_id FROM orders WHERE id > 3 LIMIT {limit}"
        decision = cached.judge(policy, sql, ctx)  # type: ignore[arg-type]
        expected = _full(full, policy, sql, ctx)
        assert decision.sql == expected.sql
        assert decision.action == expected.action
    assert not [t for t in cached._templates.values() if t is not None]


def test_writes_are_never_templated() -> None:
    cached, full, policy = _judges(example_policies(), "support-3")
    for n in (1, 2, 3):
        sql = f"DELETE FROM orders WHERE id = {n}"
        ctx = SessionContext(agent_id="support-3", task=f"T-{n}")
        decision = cached.judge(policy, sql, ctx)  # type: ignore[arg-type]
        assert decision.sql == _full(full, policy, sql, ctx).sql
    assert cached._templates == {}


def test_constants_align_token_by_token() -> None:
    sql = "SELECT -1, 2.5, 'it''s', true, NULL, $1, x - 3 FROM t WHERE a = - 7 /* c */"
    normalized = pglast.parser.normalize(sql)
    statement = tokens(sql)
    assert statement is not None
    first = first_new_parameter(statement)
    assert first == 2
    found = constants(statement, tokens(normalized) or [], first)
    assert found == ["-1", "2.5", "'it''s'", "true", "NULL", "3", "-7"]


@pytest.mark.parametrize(
    "statement, normalized",
    [
        ("SELECT a FROM t WHERE b = 1", "SELECT a FROM u WHERE b = $1"),  # another table
        ("SELECT a FROM t WHERE b = c", "SELECT a FROM t WHERE b = $1"),  # not a constant
        ("SELECT a FROM t WHERE b = 1 OR true", "SELECT a FROM t WHERE b = $1"),  # more text
        ("SELECT a FROM t WHERE b = 1", "SELECT a FROM t WHERE b = $2"),  # out of order
        ("SELECT a FROM t", "SELECT a FROM t WHERE b = $1"),  # less text
    ],
)
def test_anything_but_constants_differing_gives_no_constants(
    statement: str, normalized: str
) -> None:
    own, general = tokens(statement), tokens(normalized)
    assert own is not None and general is not None
    assert constants(own, general, first_new_parameter(own)) is None


def test_a_template_fills_only_the_parameters_normalize_added() -> None:
    printed = "SELECT a FROM t WHERE b = $1 AND c = $2 AND d = '$3' AND e = $3"
    template = Template(printed, first_new=2)
    assert template.needs == 2
    assert template.fill(["'x'", "-4"]) == (
        "SELECT a FROM t WHERE b = $1 AND c = 'x' AND d = '$3' AND e = -4"
    )
