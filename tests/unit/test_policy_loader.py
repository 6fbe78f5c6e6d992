"""guardproxy.policy loader and models: valid sets load, every error is reported with
its file, key path and what was expected (no database)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from _policy_helpers import POLICIES, copy_policies, example_policies, write

from guardproxy.analysis import Op, StatementClass
from guardproxy.policy import PolicyError, load_policy_set
from guardproxy.policy.durations import parse_duration, parse_setting_ms
from guardproxy.policy.globs import overlap

MINIMAL = "agents: [{agents}]\nupstream_role: {role}\n"


def errors_of(directory: Path) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy_set(directory)
    assert str(caught.value).startswith(f"{len(caught.value.errors)} error")
    return caught.value.errors


def one_error(directory: Path) -> str:
    errors = errors_of(directory)
    assert len(errors) == 1, errors
    return errors[0]


# -- the example set ----------------------------------------------------------------------


def test_example_policies_load_and_match() -> None:
    policies = example_policies()
    assert [p.name for p in policies] == ["analytics", "fulfillment", "support"]
    analytics = policies.match("analytics-reporting-1")
    assert analytics is not None and analytics.name == "analytics"
    assert policies.match("support-7") is policies.get("support")
    assert policies.match("fulfillment-bot") is policies.get("fulfillment")
    assert policies.match("Analytics-1") is None  # user names are case-sensitive
    assert policies.match("admin") is None


def test_example_policy_values() -> None:
    analytics = example_policies().get("analytics")
    assert analytics is not None
    assert analytics.upstream_role == "guard_analytics"
    assert analytics.mode == "enforce" and not analytics.monitor
    assert analytics.statements == {StatementClass.READ}
    assert analytics.read_only
    assert analytics.statement_timeout == timedelta(seconds=5)
    assert analytics.timeout_limits_ms()["statement_timeout"] == 5000
    assert analytics.max_server_connections == 4 and analytics.max_client_sessions == 50
    assert analytics.max_task_duration == timedelta(minutes=30)
    customers = {t.name: t for t in analytics.tables}["customers"]
    assert customers.ops == {Op.SELECT} and customers.deny_columns == {"email"}
    assert analytics.upstream_settings() == {
        "standard_conforming_strings": "on",
        "statement_timeout": "5000ms",
        "idle_in_transaction_session_timeout": "30000ms",
        "default_transaction_read_only": "on",
    }
    assert analytics.upstream_settings(170000)["transaction_timeout"] == "60000ms"
    support = example_policies().get("support")
    assert support is not None and not support.read_only
    orders = {t.name: t for t in support.tables}["orders"]
    assert orders.update_columns == frozenset({"fulfillment_status"})
    assert orders.ops == {Op.SELECT, Op.UPDATE, Op.DELETE}


# -- errors name the file, the key path and what is expected ------------------------------


def test_unknown_key_lists_the_allowed_keys(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.yaml",
        MINIMAL.format(agents="a-*", role="r_a") + "tables:\n  t:\n    opz: [select]\n",
    )
    error = one_error(tmp_path)
    assert error.startswith(
        f"{tmp_path / 'a.yaml'}: tables.t.opz: unknown key; expected one of: ops,"
    )
    assert "deny_columns" in error


def test_unknown_top_level_key(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", MINIMAL.format(agents="a-*", role="r_a") + "statment_timeout: 5s\n")
    error = one_error(tmp_path)
    assert (
        "statment_timeout: unknown key; expected one of: description, agents, upstream_role"
        in error
    )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("mode: enforcing\n", "mode: expected one of enforce, monitor; got 'enforcing'"),
        ("statements: [read, delete]\n", "statements[1]: expected one of read, write, ddl"),
        (
            "tables:\n  t:\n    ops: [select, drop]\n",
            "tables.t.ops[1]: expected one of select, insert",
        ),
        (
            "timeouts:\n  statement_timeout: 5\n",
            "timeouts.statement_timeout: expected a duration with a unit",
        ),
        (
            "timeouts:\n  statement_timeout: 5 minutes\n",
            "timeouts.statement_timeout: expected a duration such as",
        ),
        ("timeouts:\n  statement_timeout: 0s\n", "a duration must be positive"),
        (
            "limits:\n  max_server_connections: 0\n",
            "limits.max_server_connections: input should be greater than or equal to 1",
        ),
        (
            "limits:\n  max_client_sessions: many\n",
            "limits.max_client_sessions: input should be a valid integer",
        ),
        ("require_where: sometimes\n", "require_where: input should be a valid boolean"),
        (
            "tables:\n  t:\n    deny_columns: ['a b']\n",
            "tables.t.deny_columns[0]: expected a column name",
        ),
        (
            "functions:\n  allow: ['pg_sleep(1)']\n",
            "functions.allow: expected a function name or glob",
        ),
    ],
)
def test_value_errors(tmp_path: Path, extra: str, expected: str) -> None:
    write(tmp_path, "a.yaml", MINIMAL.format(agents="a-*", role="r_a") + extra)
    error = one_error(tmp_path)
    assert error.startswith(f"{tmp_path / 'a.yaml'}: ")
    assert expected in error, error


def test_missing_keys(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "mode: enforce\n")
    errors = errors_of(tmp_path)
    assert any("agents: required key is missing" in e for e in errors)
    assert any("upstream_role: required key is missing" in e for e in errors)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            "tables:\n  t:\n    ops: [delete]\n",
            "tables.t.ops: 'delete' needs 'write' in statements",
        ),
        (
            "tables:\n  t:\n    ops: [select]\n    update_columns: [a]\n",
            "tables.t.update_columns: is set but ops does not include 'update'",
        ),
        (
            "tables:\n  t:\n    columns: [a, b]\n    deny_columns: [b]\n",
            "tables.t.columns: b also in deny_columns",
        ),
        ("tables:\n  t: {}\n  T: {}\n", "tables.T: names the same table as tables.t"),
        ("tables:\n  'a b': {}\n", 'tables["a b"]: expected a table name'),
        ("functions:\n  allow: [f]\n  deny: [f]\n", "functions.allow: f also in functions.deny"),
        ("row_filters:\n  t: 'x = 1'\n", "row_filters.t: t is not in tables"),
        (
            "tables:\n  t: {}\nrow_filters:\n  t: 'owner = {user}'\n",
            "row_filters.t: unknown placeholder {user}",
        ),
        (
            "tables:\n  t: {}\nrow_filters:\n  t: 'x = = 1'\n",
            "row_filters.t: not a valid SQL condition",
        ),
        (
            "tables:\n  t: {}\nrow_filters:\n  t: 'x = 1) OR (true'\n",
            "row_filters.t: not a valid SQL condition",
        ),
        (
            "tables:\n  t: {}\nrow_filters:\n  t: 'true); DELETE FROM t; SELECT (1'\n",
            "row_filters.t: not a valid SQL condition",
        ),
        (
            "tables:\n  t: {}\nrow_filters:\n  t: 'x = $1'\n",
            "row_filters.t: use placeholders such as {principals}",
        ),
        (
            "tables:\n  t: {}\nrow_filters:\n  t: 't.owner = {agent_id}'\n",
            "row_filters.t: name the filtered table's columns unqualified",
        ),
    ],
)
def test_semantic_errors(tmp_path: Path, extra: str, expected: str) -> None:
    write(tmp_path, "a.yaml", MINIMAL.format(agents="a-*", role="r_a") + extra)
    error = one_error(tmp_path)
    assert expected in error, error


def test_yaml_problems(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "agents: [a\nupstream_role: x\n")
    assert "a.yaml: line " in one_error(tmp_path)


def test_duplicate_yaml_keys_are_errors(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.yaml",
        MINIMAL.format(agents="a-*", role="r_a")
        + "tables:\n  customers:\n    ops: [select]\n  customers:\n    ops: [select]\n",
    )
    assert "duplicate key 'customers'" in one_error(tmp_path)


def test_empty_and_odd_files(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "")
    write(tmp_path, "b.yaml", "- just\n- a list\n")
    write(tmp_path, "Bad Name.yaml", MINIMAL.format(agents="c", role="r_c"))
    errors = errors_of(tmp_path)
    assert len(errors) == 3
    assert any("a.yaml: the file is empty" in e for e in errors)
    assert any("b.yaml: expected a mapping of policy keys" in e for e in errors)
    assert any("the file name is the agent type's name" in e for e in errors)


def test_no_policy_files(tmp_path: Path) -> None:
    assert "no policy files" in one_error(tmp_path)
    assert "not a directory" in one_error(tmp_path / "missing")


def test_every_error_of_every_file_is_reported(tmp_path: Path) -> None:
    directory = copy_policies(tmp_path)
    (directory / "analytics.yaml").write_text(
        (directory / "analytics.yaml").read_text().replace("mode: enforce", "mode: loud")
    )
    (directory / "support.yaml").write_text(
        (directory / "support.yaml")
        .read_text()
        .replace("ops: [select, insert]", "ops: [select, inserts]")
    )
    write(
        directory, "extra.yaml", "agents: ['fulfillment-eu-*']\nupstream_role: guard_fulfillment\n"
    )
    errors = errors_of(directory)
    assert len(errors) == 4, errors
    assert any("analytics.yaml: mode: expected one of enforce, monitor" in e for e in errors)
    assert any("support.yaml: tables.order_state_log.ops[1]" in e for e in errors)
    assert any(
        "fulfillment.yaml: upstream_role: 'guard_fulfillment' is also the role of extra" in e
        for e in errors
    )
    assert any(
        "pattern 'fulfillment-*' of fulfillment overlaps 'fulfillment-eu-*' of extra" in e
        and "such as 'fulfillment-eu-'" in e
        for e in errors
    )


@pytest.mark.parametrize(
    ("first", "second", "example"),
    [
        ("analytics-*", "analytics-admin", "analytics-admin"),
        ("a*", "*b", "ab"),
        ("agent-?", "agent-[0-9]*", "agent-0"),
        ("*", "x", "x"),
    ],
)
def test_overlapping_agent_patterns_are_rejected(
    tmp_path: Path, first: str, second: str, example: str
) -> None:
    write(tmp_path, "one.yaml", MINIMAL.format(agents=f"'{first}'", role="r1"))
    write(tmp_path, "two.yaml", MINIMAL.format(agents=f"'{second}'", role="r2"))
    error = one_error(tmp_path)
    assert f"an agent id such as {example!r} would match both types" in error


def test_disjoint_agent_patterns_load(tmp_path: Path) -> None:
    write(tmp_path, "one.yaml", MINIMAL.format(agents="'agent-[0-4]*', 'x?'", role="r1"))
    write(tmp_path, "two.yaml", MINIMAL.format(agents="'agent-[5-9]*', 'x??'", role="r2"))
    policies = load_policy_set(tmp_path)
    assert policies.match("agent-3") is policies.get("one")
    assert policies.match("agent-77") is policies.get("two")
    assert policies.match("xy") is policies.get("one")
    assert policies.match("xyz") is policies.get("two")


@pytest.mark.parametrize(
    ("a", "b", "witness"),
    [
        ("a*", "b*", None),
        ("*a", "*b", None),
        ("a?c", "abc", "abc"),
        ("[!a]*", "a*", None),
        ("[!a]*", "[!b]x", "xx"),
        ("support-*", "support-*-eu", "support--eu"),
        ("*-prod", "*-staging", None),
        ("x[", "x[", "x["),
    ],
)
def test_glob_overlap(a: str, b: str, witness: str | None) -> None:
    assert overlap(a, b) == witness
    assert overlap(b, a) is None if witness is None else overlap(b, a) is not None


def test_names_fold_like_sql(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.yaml",
        MINIMAL.format(agents="a", role="r")
        + "tables:\n  Customers:\n    deny_columns: [EMAIL]\n  '\"Mixed\"': {}\n  sales.orders: {}\n",
    )
    policy = load_policy_set(tmp_path).get("a")
    assert policy is not None
    rules = {(t.schema, t.name): t for t in policy.tables}
    assert rules[(None, "customers")].deny_columns == {"email"}
    assert (None, "Mixed") in rules and ("sales", "orders") in rules


def test_policy_files_in_the_repository_are_the_examples() -> None:
    assert sorted(p.name for p in POLICIES.glob("*.yaml")) == [
        "analytics.yaml",
        "fulfillment.yaml",
        "support.yaml",
    ]


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("5s", 5000),
        ("500ms", 500),
        ("2min", 120_000),
        ("1.5 s", 1500),
        ("1h", 3_600_000),
        ("1d", 86_400_000),
        ("250us", 0.25),
    ],
)
def test_durations(text: str, ms: float) -> None:
    assert parse_duration(text) == timedelta(milliseconds=ms)


@pytest.mark.parametrize(
    ("text", "ms"),
    [("1000", 1000), ("5s", 5000), ("1min", 60_000), ("0", 0), ("x", None), ("5 parsecs", None)],
)
def test_setting_values_like_postgres(text: str, ms: int | None) -> None:
    assert parse_setting_ms(text) == ms
