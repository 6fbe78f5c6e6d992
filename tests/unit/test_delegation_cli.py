"""`guardproxy token keygen|mint|rls` and `guardproxy explain --token`, run as a user
runs them; the minted tokens are checked by the verifier, not by the CLI that made them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pglast
import pytest

from guardproxy.analysis.model import Op
from guardproxy.config import DelegationIssuer
from guardproxy.delegation.verify import Verifier

ROOT = Path(__file__).resolve().parents[2]


def gp(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guardproxy", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        input=stdin,
        check=False,
    )


def verifier(key_file: Path, issuer: str = "guardproxy-dev") -> Verifier:
    return Verifier([DelegationIssuer.model_validate({"issuer": issuer, "key_file": key_file})])


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    out = gp("token", "keygen", "--out", str(directory / "shop"))
    assert out.returncode == 0, out.stderr
    return directory


def test_keygen_writes_a_private_key_only_its_owner_reads(keys: Path) -> None:
    private, public = keys / "shop.key", keys / "shop.pub"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    again = gp("token", "keygen", "--out", str(keys / "shop"))
    assert again.returncode != 0  # never overwrites a key


def test_minted_tokens_verify_with_the_public_key(keys: Path) -> None:
    out = gp(
        "token", "mint", "--key", str(keys / "shop.key"), "--agent", "support-1",
        "--principals", "42,43", "--task", "T-9", "--ttl", "15m",
        "--tables", "orders:select+update,customers",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout.strip()
    d = verifier(keys / "shop.pub").verify(text, "support-1", time.time())
    assert (d.principals, d.task, d.expires_at - d.issued_at) == (("42", "43"), "T-9", 900.0)
    assert d.narrowing is not None and d.narrowing.tables is not None
    ops = {t.key: t.ops for t in d.narrowing.tables}
    assert ops["orders"] == frozenset({Op.SELECT, Op.UPDATE})
    assert ops["customers"] is not None and Op.SELECT in ops["customers"]


def test_hmac_keys_mint_hs256(tmp_path: Path) -> None:
    assert gp("token", "keygen", "--alg", "HS256", "--out", str(tmp_path / "s")).returncode == 0
    secret = tmp_path / "s.key"
    out = gp("token", "mint", "--key", str(secret), "--agent", "a-1", "--issuer", "app")
    assert out.returncode == 0, out.stderr
    d = verifier(secret, "app").verify(out.stdout.strip(), "a-1", time.time())
    assert d.principals == () and d.issuer == "app"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ttl", "soon"], "--ttl 'soon'"),
        (["--tables", "orders:drop"], "TABLE:OP+OP"),
        (["--key-is-public"], "cannot sign"),
    ],
)
def test_mint_says_what_is_wrong(keys: Path, extra: list[str], message: str) -> None:
    key = keys / ("shop.pub" if extra == ["--key-is-public"] else "shop.key")
    args = [a for a in extra if a != "--key-is-public"]
    out = gp("token", "mint", "--key", str(key), "--agent", "support-1", *args)
    assert out.returncode == 2 and message in out.stderr


def mint(keys: Path, *extra: str) -> str:
    out = gp("token", "mint", "--key", str(keys / "shop.key"), "--principals", "42", *extra)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_explain_shows_the_rules_narrowed_by_the_token(keys: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(
        mint(keys, "--agent", "support-*", "--tables", "orders:select+truncate,payments")
    )
    key = ["--key", str(keys / "shop.pub")]
    out = gp("explain", "--agent", "support-4", "--token", str(token_file), *key)
    assert out.returncode == 0, out.stderr
    assert "signature, expiry, audience and agent verified" in out.stdout
    assert "acting for 42" in out.stdout
    assert "  table orders: select;" in out.stdout
    assert "table customers" not in out.stdout and "table order_state_log" not in out.stdout
    assert "not granted: table orders: truncate not allowed by policy support" in out.stdout
    assert "not granted: table payments: not in the tables of policy support" in out.stdout
    update = "UPDATE orders SET fulfillment_status = 'packed' WHERE id = 1"
    denied = gp("explain", update, "--agent", "support-4", "--token", str(token_file), *key)
    assert denied.returncode == 1 and "decision: deny" in denied.stdout
    assert "rule: tables.orders.ops" in denied.stdout
    plain = gp("explain", update, "--agent", "support-4")
    assert plain.returncode == 0  # the policy alone allows it
    unverified = gp("explain", "--agent", "support-4", "--token", "-", stdin=token_file.read_text())
    assert unverified.returncode == 0 and "NOT verified" in unverified.stdout


def test_explain_refuses_a_token_for_another_agent(keys: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(mint(keys, "--agent", "support-1"))
    out = gp(
        "explain", "--agent", "support-2", "--token", str(token_file),
        "--key", str(keys / "shop.pub"),
    )  # fmt: skip
    assert out.returncode == 1 and "token refused" in out.stdout and "'support-1'" in out.stdout
    assert token_file.read_text().strip() not in out.stdout + out.stderr
    assert gp("explain", "--agent", "support-2").returncode == 2  # neither SQL nor --token


def delegated_policies(directory: Path) -> Path:
    """The example policies with support taking delegation tokens (delegation: required)."""
    target = directory / "policies"
    target.mkdir()
    for source in (ROOT / "policies").glob("*.yaml"):
        text = source.read_text()
        if source.name == "support.yaml":
            text = text.replace("\nstatements:", "\ndelegation: required\nstatements:", 1)
        (target / source.name).write_text(text)
    return target


def test_rls_prints_the_policy_for_the_roles_that_use_the_table(tmp_path: Path) -> None:
    policies = str(delegated_policies(tmp_path))
    out = gp("token", "rls", "orders", "--column", "customer_id", "--type", "bigint",
             "--policies", policies)  # fmt: skip
    assert out.returncode == 0, out.stderr
    sql = out.stdout
    assert "ALTER TABLE orders ENABLE ROW LEVEL SECURITY;" in sql
    assert "CREATE POLICY guard_principals ON orders FOR ALL TO guard_support\n" in sql
    assert "::bigint[]" in sql
    # the types without tokens keep their rows rather than see none once RLS is on
    keep = "CREATE POLICY guard_no_delegation ON orders FOR ALL TO guard_analytics, "
    assert keep + "guard_fulfillment USING (true);" in sql
    assert len(pglast.parse_sql(sql)) == 5
    missing = gp("token", "rls", "nowhere", "--column", "x", "--policies", policies)
    assert missing.returncode == 2 and "no agent type lists nowhere" in missing.stderr
    # a table only types without tokens use: RLS there would only hide rows from them
    off = gp("token", "rls", "orders", "--column", "customer_id")
    assert off.returncode == 2
    assert "no agent type that takes delegation tokens lists orders" in off.stderr
    assert "analytics, fulfillment, support list it, with delegation: off" in off.stderr


def test_roles_ends_its_script_with_the_rls_of_each_table_named(tmp_path: Path) -> None:
    policies = str(delegated_policies(tmp_path))
    schema = str(ROOT / "sql" / "example_schema.sql")
    out = gp("roles", "--policies", policies, "--schema", schema, "--rls", "orders:customer_id")
    assert out.returncode == 0, out.stderr
    alone = gp("token", "rls", "orders", "--column", "customer_id", "--type", "bigint",
               "--policies", policies)  # fmt: skip
    assert out.stdout.endswith("\n" + alone.stdout)  # the type comes from the schema
    assert out.stdout.startswith(gp("roles", "--policies", policies, "--schema", schema).stdout)
    pglast.parse_sql(out.stdout)
    text_typed = gp("roles", "--policies", policies, "--rls", "orders:customer_id:text")
    assert "customer_id = ANY (" in text_typed.stdout and "::text[]" in text_typed.stdout
    for spec, problem in (
        ("orders", "expected TABLE:COLUMN or TABLE:COLUMN:TYPE"),
        ("orders:nope", "table orders has no column nope (columns: id, customer_id"),
        ("nowhere:x", "no table nowhere in the database"),
        ("payments:order_id", "no agent type lists payments"),
    ):
        bad = gp("roles", "--policies", policies, "--schema", schema, "--rls", spec)
        assert bad.returncode == 2 and problem in bad.stderr, (spec, bad.stderr)
        assert bad.stdout == ""
