"""What a session does with a token (guardproxy/delegation/binding.py), the statement
that shows it to Postgres (postgres.py), the admin console's parsing (console.py), and
the judge's refusal of guard.* changes that would reach Postgres."""

from __future__ import annotations

from pathlib import Path

import pglast
import pytest
from _policy_helpers import copy_policies, judge
from _tokens import NOW, issuer, key_pair, token

from guardproxy.delegation import binding, console
from guardproxy.delegation.claims import Delegation
from guardproxy.delegation.errors import TokenError
from guardproxy.delegation.postgres import (
    delegation_settings,
    rls_policy_sql,
    settings_change,
    settings_sql,
)
from guardproxy.delegation.revocations import Revocation, RevocationSet
from guardproxy.delegation.verify import Verifier
from guardproxy.policy import AgentPolicy, SessionContext, load_policy_set
from guardproxy.protocol.errors import GuardError


def delegation(**changes: object) -> Delegation:
    values: dict[str, object] = {
        "agent_id": "support-1",
        "subject": "support-*",
        "issuer": "shop-app",
        "token_id": "run-1",
        "principals": ("42", "43"),
        "task": "T-17",
        "issued_at": NOW,
        "expires_at": NOW + 900,
        "narrowing": None,
        "fingerprint": "0123456789abcdef",
    }
    values.update(changes)
    return Delegation(**values)  # type: ignore[arg-type]


def policy_with(tmp_path: Path, mode: str) -> AgentPolicy:
    directory = copy_policies(tmp_path)
    path = directory / "support.yaml"
    path.write_text(path.read_text() + f"\ndelegation: {mode}\n")
    policy = load_policy_set(directory).match("support-1")
    assert policy is not None and binding.mode(policy) == mode
    return policy


def test_the_token_is_taken_out_of_context_updates() -> None:
    token_text, rest = binding.take_token(
        {"guard.token": "eyJ.a.b", "guard.step": "s1", "GUARD.TASK": "T"}
    )
    assert token_text == "eyJ.a.b" and rest == {"guard.step": "s1", "GUARD.TASK": "T"}
    assert binding.take_token({"step": "s"}) == (None, {"step": "s"})


def test_a_jws_is_told_from_a_password(tmp_path: Path) -> None:
    key, _ = key_pair("EdDSA", tmp_path)
    assert binding.looks_like_token(token(key))
    for password in ("hunter2", "eyJ", "eyJhbGciOi.x.y", "a.b.c"):
        assert not binding.looks_like_token(password)


def test_context_keys_the_token_decides_are_refused(tmp_path: Path) -> None:
    required = policy_with(tmp_path / "r", "required")
    optional = policy_with(tmp_path / "o", "optional")
    with pytest.raises(GuardError) as caught:
        binding.check_context_updates(required, {"guard.principals": "99"}, None, "SET")
    assert caught.value.sqlstate == "42501" and "guard.principals" in caught.value.message
    binding.check_context_updates(optional, {"guard.principals": "99"}, None, "SET")  # no token
    with pytest.raises(GuardError, match=r"guard\.task comes from the session's delegation token"):
        binding.check_context_updates(optional, {"task": "T-99"}, delegation(), "comment")
    binding.check_context_updates(optional, {"task": "T-99"}, delegation(task=None), "comment")
    binding.check_context_updates(optional, {"guard.step": "s2"}, delegation(), "SET")
    with pytest.raises(GuardError, match="token_id"):
        binding.check_context_updates(optional, {"guard.token_id": "x"}, delegation(), "startup")
    with pytest.raises(GuardError, match="SQL comment"):
        binding.check_context_updates(optional, {"token": "eyJ..."}, None, "comment")


def test_a_required_type_runs_nothing_without_a_token(tmp_path: Path) -> None:
    required = policy_with(tmp_path, "required")
    with pytest.raises(TokenError) as caught:
        binding.gate(required, None, None, NOW)
    assert (caught.value.kind, caught.value.sqlstate) == ("missing", "28000")
    assert "needs a delegation token" in caught.value.message
    binding.gate(policy_with(tmp_path / "o", "optional"), None, None, NOW)


def test_present_verifies_for_the_agent_and_gate_catches_expiry(tmp_path: Path) -> None:
    key, path = key_pair("EdDSA", tmp_path)
    verifier = Verifier([issuer(path)], 30.0)
    optional = policy_with(tmp_path / "o", "optional")
    d = binding.present(optional, verifier, token(key), "support-1", NOW)
    binding.gate(optional, d, verifier, NOW + 10)
    with pytest.raises(TokenError, match="expired at"):
        binding.gate(optional, d, verifier, NOW + 3600)
    with pytest.raises(TokenError, match="delegation: off"):
        binding.present(policy_with(tmp_path / "f", "off"), verifier, token(key), "support-1", NOW)
    with pytest.raises(TokenError, match="no issuer is configured"):
        binding.present(optional, None, token(key), "support-1", NOW)


def test_the_context_takes_the_tokens_principals_and_task() -> None:
    ctx = SessionContext(agent_id="support-1", task="declared", principals=("7",))
    bound = binding.bind_context(ctx, delegation())
    assert (bound.principals, bound.task) == (("42", "43"), "T-17")
    assert binding.bind_context(ctx, delegation(task=None)).task == "declared"


def test_the_settings_statement_quotes_every_value() -> None:
    assert settings_sql(None) == (
        "SET guard.principals = ''; SET guard.task = ''; SET guard.token_id = ''"
    )
    sql = settings_sql(delegation(principals=("o'brien", "42"), task="a\\b'; DROP TABLE x"))
    assert sql == (
        "SET guard.principals = 'o''brien,42'; "
        "SET guard.task = E'a\\\\b''; DROP TABLE x'; SET guard.token_id = 'run-1'"
    )
    assert len(pglast.parse_sql(sql)) == 3  # three SETs, nothing else
    assert delegation_settings(delegation())["guard.principals"] == "42,43"
    with pytest.raises(ValueError):
        settings_sql(delegation(task="a\x00b"))


def test_the_rls_policy_is_valid_sql_with_quoted_names() -> None:
    sql = rls_policy_sql("Orders", "customer_id", ["guard_support", "Team Role"], "bigint", "shop")
    assert 'ALTER TABLE shop."Orders" ENABLE ROW LEVEL SECURITY;' in sql
    assert 'TO guard_support, "Team Role"' in sql
    assert "customer_id = ANY (string_to_array(nullif(current_setting('guard.principals'" in sql
    assert "::bigint[]" in sql
    assert len(pglast.parse_sql(sql)) == 3
    assert "customer_id::text = ANY" in rls_policy_sql("orders", "customer_id", ["r"])


# -- the judge ----------------------------------------------------------------------


def test_guard_settings_cannot_reach_postgres_through_the_judge(tmp_path: Path) -> None:
    for sql in (
        "SELECT set_config('guard.principals', '99', false)",
        "SELECT set_config('guard.step', 's', true)",
        "SET guard.principals = '99'; SELECT id FROM orders WHERE id = 1",
        "SELECT 1; SET guard.token_id = 'x'",
        "RESET guard.task; SELECT 1",
        "SET guard.token = 'eyJ.a.b'; SELECT 1",
    ):
        decision = judge("support", sql)
        assert (decision.action, decision.rule) == ("deny", "settings.guard"), sql
        assert decision.sql == ""
    alone = judge("support", "SET guard.principals = '99'; SET guard.token = 'eyJ.a.b'")
    assert alone.proxy_only and alone.sql == ""  # guardproxy's context, never sent upstream
    mixed = judge("support", "SET guard.step = 's2'; SELECT id FROM orders WHERE id = 1")
    assert mixed.action != "deny"  # a plain tag may still travel with a statement
    directory = copy_policies(tmp_path)
    path = directory / "support.yaml"
    path.write_text(path.read_text().replace("mode: enforce", "mode: monitor"))
    monitored = judge(
        "support", "SET guard.principals = '9'; SELECT 1", policies=load_policy_set(directory)
    )
    assert monitored.action == "deny"  # monitor mode lets policy denials run, not this


# -- admin console ------------------------------------------------------------------


def test_console_commands_are_parsed() -> None:
    assert console.parse("SHOW TOKENS") == console.Command("show_tokens")
    assert console.parse("show revocations;") == console.Command("show_revocations")
    assert console.parse("SHOW POOLS") is None and console.parse("RELOAD") is None
    assert console.parse("revoke token run-1") == console.Command("revoke", "token", "run-1")
    assert console.parse(
        "REVOKE TOKENS FOR PRINCIPAL '4''2' ISSUER shop-app REASON 'left the company';"
    ) == console.Command("revoke", "principal", "4'2", "shop-app", "left the company")
    assert console.parse("UNREVOKE TOKEN 'run-1'") == console.Command("unrevoke", "token", "run-1")
    for bad in ("REVOKE TOKEN", "REVOKE ALL", "UNREVOKE TOKEN x REASON 'y'", "REVOKE TOKEN a b"):
        with pytest.raises(GuardError) as caught:
            console.parse(bad)
        assert caught.value.sqlstate == "42601" and "REVOKE TOKEN <jti>" in (
            caught.value.hint or ""
        )


def test_show_tokens_lists_each_token_with_its_state() -> None:
    class Cache:
        current = RevocationSet([Revocation("token", "run-2", "", NOW, "admin")])

    rows = console.show_tokens(
        [
            delegation(),
            delegation(),
            delegation(token_id="run-2"),
            delegation(token_id="old", expires_at=NOW - 1),
        ],
        Cache(),  # type: ignore[arg-type]
        NOW,
    )
    columns, data, tag = rows
    assert tag == "SHOW 3" and columns[:4] == ["token_id", "issuer", "agent", "principals"]
    by_id = {row[0]: row for row in data}
    assert by_id["run-1"][6:8] == ["2", "valid"] and by_id["run-1"][3] == "42,43"
    assert by_id["run-2"][7] == "revoked" and by_id["old"][7] == "expired"


def test_tokens_are_redacted_from_statement_texts(tmp_path: Path) -> None:
    key, _ = key_pair("ES256", tmp_path)
    text = token(key)
    sql = f"SET guard.token = '{text}'; SELECT 1"
    redacted = binding.redact(sql)
    assert text not in redacted and text.split(".")[2] not in redacted
    assert redacted.startswith("SET guard.token = '<token ") and redacted.endswith("'; SELECT 1")
    assert binding.redact("SELECT 'eyJ' || x") == "SELECT 'eyJ' || x"


def test_settings_are_sent_only_when_they_change() -> None:
    unset = delegation_settings(None)
    assert settings_change(unset, None) == (None, unset)
    sql, values = settings_change(unset, delegation())
    assert sql == settings_sql(delegation()) and values["guard.token_id"] == "run-1"
    assert settings_change(values, delegation())[0] is None
    assert settings_change(values, None)[0] == settings_sql(None)  # the next client has none
    assert settings_change(None, delegation())[0] is not None  # unknown after RESET ALL
