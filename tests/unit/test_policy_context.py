"""Session context: sqlcommenter comments, SET guard.* updates, prepared statements."""

from __future__ import annotations

import pytest

from guardproxy.policy import SessionContext, parse_context_comment
from guardproxy.policy.context import MAX_TAGS, FrozenMap


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT 1", {}),
        (
            "SELECT 1 /* task='T-17',step='refund%202',principals='42%2C43' */",
            {"task": "T-17", "step": "refund 2", "principals": "42,43"},
        ),
        ("/*task='a'*/ SELECT 1 /* step='s' */", {"task": "a", "step": "s"}),
        ("SELECT 1 /* task='a' */ /* task='b' */", {"task": "b"}),
        (
            "SELECT 1 /* task = 'x' , traceparent='00-abc-01' */",
            {"task": "x", "traceparent": "00-abc-01"},
        ),
        ("SELECT 1 /* task='it\\'s' */", {"task": "it's"}),
        ("SELECT 1 /* just a comment */", {}),
        ("SELECT 1 /* task='a', not a pair */", {}),
        ("SELECT '/* task=''x'' */'", {}),
        ("SELECT E'\\' /* task=''x'' */'", {}),
        ("SELECT 1 AS \"/* task='x' */\"", {}),
        ("SELECT $$ /* task='x' */ $$", {}),
        ("SELECT $q$ $$ /* task='x' */ $q$ /* task='y' */", {"task": "y"}),
        ("SELECT 1 -- /* task='x' */\n", {}),
        ("SELECT 1 /* outer /* nested */ still */ /* task='z' */", {"task": "z"}),
        ("SELECT 1 /* task='unterminated'", {"task": "unterminated"}),
    ],
)
def test_parse_context_comment(sql: str, expected: dict[str, str]) -> None:
    assert parse_context_comment(sql) == expected


def test_with_updates_from_set_and_comments() -> None:
    ctx = SessionContext(agent_id="support-3")
    ctx = ctx.with_updates(
        {"guard.task": "T-1", "guard.principals": " 42, 43 ,,", "guard.region": "eu"}
    )
    assert (ctx.task, ctx.principals, dict(ctx.tags)) == ("T-1", ("42", "43"), {"region": "eu"})
    ctx = ctx.with_updates({"step": "s1", "traceparent": "00-x"})
    assert ctx.step == "s1" and ctx.tags["traceparent"] == "00-x"
    cleared = ctx.with_updates({"guard.task": "", "guard.region": "", "agent_id": "admin"})
    assert cleared.task is None and "region" not in cleared.tags
    assert cleared.agent_id == "support-3"  # the login cannot be changed by context
    assert ctx.with_updates({}) is ctx


def test_context_is_frozen_hashable_and_bounded() -> None:
    ctx = SessionContext(agent_id="a", tags={"k": "v"}, principals=["1"])  # type: ignore[arg-type]
    assert isinstance(ctx.tags, FrozenMap) and ctx.principals == ("1",)
    assert hash(ctx) == hash(SessionContext(agent_id="a", tags={"k": "v"}, principals=("1",)))
    many = ctx.with_updates({f"t{i}": "x" for i in range(MAX_TAGS * 2)})
    assert len(many.tags) == MAX_TAGS
    long = ctx.with_updates({"task": "x" * 5000})
    assert long.task is not None and len(long.task) == 1024
    with pytest.raises(AttributeError):
        ctx.task = "x"  # type: ignore[misc]


def test_prepared_statements_bookkeeping() -> None:
    ctx = SessionContext(agent_id="a").with_prepared("p", "SELECT 1").with_prepared("q", "SELECT 2")
    assert dict(ctx.prepared) == {"p": "SELECT 1", "q": "SELECT 2"}
    assert dict(ctx.with_prepared("p", None).prepared) == {"q": "SELECT 2"}
    assert dict(ctx.with_prepared("", None).prepared) == {}


def test_placeholder_values() -> None:
    ctx = SessionContext(agent_id="a", task="t", tags={"region": "eu"})
    assert ctx.placeholder_values() == {
        "agent_id": "a",
        "task": "t",
        "step": None,
        "tag.region": "eu",
    }
