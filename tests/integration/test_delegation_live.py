"""Delegation tokens through the real proxy: an agent of a `required` type sees only its
token's principals' rows, through the policy's row filters and through a real
row-level security policy in Postgres; forged, widened, expired, unsigned and swapped
claims change nothing; a revocation reaches a second proxy instance; the audit log says
on behalf of whom."""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest
import shop
from cryptography.hazmat.primitives.asymmetric import ed25519
from pgcluster import PG_BINDIR, PgCluster, free_port
from proofkit import policies_with
from shop import ROOT, SHOP_DB, ShopProxy, launch_proxy

from guardproxy.delegation.mint import SigningKey, generate_key, mint
from guardproxy.delegation.postgres import rls_policy_sql

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline
clean_shop = shop.clean_shop

ISSUER = "shop-app"
# support agents work on behalf of customers: rows filtered by their token's principals
REQUIRED = {
    "delegation": "required",
    "row_filters": {"orders": "customer_id = ANY({principals})"},
}


@pytest.fixture
def signing(tmp_path: Path) -> tuple[SigningKey, Path]:
    private, public = generate_key("EdDSA")
    (tmp_path / "issuer.pub").write_bytes(public)
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private, password=None)
    return SigningKey("EdDSA", key, None), tmp_path / "issuer.pub"


def issuers(public: Path) -> str:
    return json.dumps([{"issuer": ISSUER, "key_file": str(public), "audiences": ["guardproxy"]}])


@contextlib.contextmanager
def proxy_with(
    pg: PgCluster,
    tmp_path: Path,
    public: Path,
    name: str = "guardproxy",
    settings: dict[str, Any] | None = None,
    **changes: Any,
) -> Iterator[ShopProxy]:
    """A proxy trusting the test's issuer, with the example policies changed by
    `changes` per agent type and `settings` on top of the test's own."""
    policies = policies_with(tmp_path / name, **changes)
    with launch_proxy(
        pg,
        tmp_path / f"{name}.log",
        policies=policies,
        delegation_issuers=issuers(public),
        delegation_revocations_refresh=60,
        admin_users="admin",
        **(settings or {}),
    ) as proxy:
        try:
            yield proxy
        except BaseException:
            print(f"\n----- {name} log -----\n{proxy.log()[-6000:]}")
            raise


def token_for(key: SigningKey, principals: list[str], agent: str = "support-7", **kw: Any) -> str:
    return mint(key, agent=agent, principals=principals, issuer=ISSUER, **kw)


def order_ids(conn: psycopg.Connection[Any]) -> list[int]:
    return [r[0] for r in conn.execute("SELECT id FROM orders WHERE id > 0 ORDER BY id")]


def connect(proxy: ShopProxy, token: str | None = None) -> psycopg.Connection[Any]:
    options = f"-c guard.token={token}" if token else ""
    return proxy.connect("support-7", autocommit=True, options=options)


def test_a_required_type_sees_only_its_tokens_principals(
    clean_shop: PgCluster, tmp_path: Path, signing: tuple[SigningKey, Path]
) -> None:
    key, public = signing
    with proxy_with(clean_shop, tmp_path, public, support=REQUIRED) as proxy:
        with connect(proxy) as conn:  # no token: logged in, but nothing runs
            with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification) as refused:
                conn.execute("SELECT id FROM orders WHERE id > 0")
            assert "delegation token" in str(refused.value)
        with connect(proxy, token_for(key, ["1"])) as conn:
            assert order_ids(conn) == [1, 2]
            # principals cannot be declared next to (or instead of) the token
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SET guard.principals = '1,2,3,4'")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("/* principals='2' */ SELECT id FROM orders WHERE id > 0")
            assert order_ids(conn) == [1, 2]
            # a fresh token for another customer, presented outside a transaction
            conn.execute(f"SET guard.token = '{token_for(key, ['2'])}'")
            assert order_ids(conn) == [3, 6]


def test_forged_widened_expired_and_unsigned_tokens_change_nothing(
    clean_shop: PgCluster, tmp_path: Path, signing: tuple[SigningKey, Path]
) -> None:
    key, public = signing
    good = token_for(key, ["1"])
    header, claims, signature = good.split(".")
    payload = json.loads(jwt.utils.base64url_decode(claims))
    payload["principals"] = ["1", "2", "3", "4"]  # widened, signature kept
    widened = ".".join(
        (header, jwt.utils.base64url_encode(json.dumps(payload).encode()).decode(), signature)
    )
    unsigned = jwt.encode({**payload, "exp": int(time.time()) + 600}, None, algorithm="none")
    other_key, _ = generate_key("EdDSA")
    from cryptography.hazmat.primitives import serialization

    forged = mint(
        SigningKey("EdDSA", serialization.load_pem_private_key(other_key, None), None),
        agent="support-7",
        principals=["1", "2", "3", "4"],
        issuer=ISSUER,
    )
    expired = token_for(key, ["1", "2"], now=time.time() - 3600, ttl=60)
    someone_else = token_for(key, ["1", "2", "3", "4"], agent="support-8")
    before = clean_shop.psql("SELECT string_agg(id::text, ',') FROM orders", dbname=SHOP_DB)
    with proxy_with(clean_shop, tmp_path, public, support=REQUIRED) as proxy:
        for bad in (widened, unsigned, forged, expired, someone_else):
            with pytest.raises(psycopg.OperationalError) as refused:
                connect(proxy, bad)
            assert bad not in str(refused.value)  # a token is never echoed
        with connect(proxy, good) as conn:
            for bad in (widened, unsigned, forged, expired, someone_else):
                with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification):
                    conn.execute(f"SET guard.token = '{bad}'")
                assert order_ids(conn) == [1, 2]  # still the good token's principals
            # another customer's orders: out of the token's reach, nothing deleted
            assert conn.execute("DELETE FROM orders WHERE customer_id = 3").rowcount == 0
    after = clean_shop.psql("SELECT string_agg(id::text, ',') FROM orders", dbname=SHOP_DB)
    assert after == before


def test_a_token_that_expires_mid_session_stops_the_session(
    clean_shop: PgCluster, tmp_path: Path, signing: tuple[SigningKey, Path]
) -> None:
    key, public = signing
    with proxy_with(clean_shop, tmp_path, public, support=REQUIRED) as proxy:
        short = token_for(key, ["1"], ttl=2)
        with connect(proxy, short) as conn:
            assert order_ids(conn) == [1, 2]
            deadline = time.monotonic() + 40  # the clock skew allowed is 30 s
            with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification) as expired:
                while time.monotonic() < deadline:
                    order_ids(conn)
                    time.sleep(0.5)
            assert "expired" in str(expired.value)


@pytest.fixture
def rls_orders(clean_shop: PgCluster) -> Iterator[PgCluster]:
    """The shop with a row-level security policy on orders fed by guard.principals."""
    clean_shop.psql(
        rls_policy_sql("orders", "customer_id", ["guard_support"], column_type="bigint"),
        dbname=SHOP_DB,
    )
    try:
        yield clean_shop
    finally:
        clean_shop.psql(
            "DROP POLICY IF EXISTS guard_principals ON orders; "
            "ALTER TABLE orders DISABLE ROW LEVEL SECURITY",
            dbname=SHOP_DB,
        )


def test_principals_reach_postgres_for_row_level_security(
    rls_orders: PgCluster, tmp_path: Path, signing: tuple[SigningKey, Path]
) -> None:
    key, public = signing
    pg = rls_orders
    # no row filter in the policy: what the agent sees is Postgres's RLS, fed by the proxy
    with proxy_with(pg, tmp_path, public, support={"delegation": "required"}) as proxy:
        with connect(proxy, token_for(key, ["3"])) as conn:
            assert order_ids(conn) == [4]
            shown = conn.execute("SELECT current_setting('guard.principals')").fetchone()
            assert shown == ("3",)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT set_config('guard.principals', '1,2,3,4', false)")
            assert order_ids(conn) == [4]
        with connect(proxy, token_for(key, ["1", "4"])) as conn:
            assert order_ids(conn) == [1, 2, 5]


def _statuses(pg: PgCluster) -> dict[int, str]:
    out = pg.psql("SELECT id, fulfillment_status FROM orders WHERE id > 0", dbname=SHOP_DB)
    return {int(i): status for i, status in (line.split("|") for line in out.split())}


def test_a_server_shared_by_two_delegated_sessions_carries_each_ones_principals(
    rls_orders: PgCluster, tmp_path: Path, signing: tuple[SigningKey, Path]
) -> None:
    # One server for both sessions: each round must run under its own session's
    # principals, in the extended protocol (parameters) as in the simple one.
    key, public = signing
    pg = rls_orders
    ids = "SELECT id FROM orders WHERE id > %s ORDER BY id"
    before = _statuses(pg)
    with (
        proxy_with(
            pg, tmp_path, public, support={"delegation": "required"}, settings={"pool_size": 1}
        ) as proxy,
        connect(proxy, token_for(key, ["3"])) as a,
        connect(proxy, token_for(key, ["1", "4"])) as b,
    ):
        for _ in range(3):
            assert [r[0] for r in a.execute(ids, (0,))] == [4]
            assert [r[0] for r in b.execute(ids, (0,))] == [1, 2, 5]
            assert order_ids(a) == [4]
            assert order_ids(b) == [1, 2, 5]
            with a.transaction():
                assert [r[0] for r in a.execute(ids, (0,))] == [4]
            with b.transaction():
                assert [r[0] for r in b.execute(ids, (0,))] == [1, 2, 5]
        # a write the policy manages (row cap, budget, idempotency) runs as a job of
        # the proxy's own on the server: under its session's principals too
        for step, (conn, status) in enumerate(((b, "returned"), (a, "cancelled"), (b, "packed"))):
            conn.execute(f"SET guard.step = 's{step}'")
            conn.execute("UPDATE orders SET fulfillment_status = %s WHERE id > %s", (status, 0))
        statuses = _statuses(pg)
        assert statuses[4] == "cancelled"
        assert {statuses[i] for i in (1, 2, 5)} == {"packed"}
        # and as a simple Query, which goes to the job without a message before it
        for step, (conn, status) in enumerate(((a, "returned"), (b, "cancelled"))):
            conn.execute(f"SET guard.step = 't{step}'")
            conn.execute(f"UPDATE orders SET fulfillment_status = '{status}' WHERE id > 0")
            conn.execute(f"SET guard.step = 'u{step}'")
            conn.execute(f"UPDATE orders SET fulfillment_status = '{status}' WHERE id > 0")
    statuses = _statuses(pg)
    assert statuses[4] == "returned"
    assert {statuses[i] for i in (1, 2, 5)} == {"cancelled"}
    assert (statuses[3], statuses[6]) == (before[3], before[6])  # no principal's


def test_a_revocation_reaches_a_second_instance(
    clean_shop: PgCluster, tmp_path: Path, signing: tuple[SigningKey, Path]
) -> None:
    key, public = signing
    token = token_for(key, ["1"], token_id="jti-revoke-me")
    with (
        proxy_with(clean_shop, tmp_path, public, name="one", support=REQUIRED) as one,
        proxy_with(clean_shop, tmp_path, public, name="two", support=REQUIRED) as two,
        connect(two, token) as conn,
    ):
        assert order_ids(conn) == [1, 2]
        with psycopg.connect(
            f"postgresql://admin@127.0.0.1:{one.port}/guardproxy", autocommit=True
        ) as admin:
            admin.execute("REVOKE TOKEN 'jti-revoke-me' REASON 'leaked'")
        deadline = time.monotonic() + 15
        with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification) as revoked:
            while time.monotonic() < deadline:
                order_ids(conn)
                time.sleep(0.2)
        assert "revoked" in str(revoked.value)


def test_the_audit_log_says_on_behalf_of_whom(
    clean_shop: PgCluster, tmp_path: Path, signing: tuple[SigningKey, Path]
) -> None:
    key, public = signing
    pg = clean_shop
    with (
        proxy_with(pg, tmp_path, public, support=REQUIRED) as proxy,
        connect(proxy, token_for(key, ["2"], token_id="jti-audit", task="T-audit")) as conn,
    ):
        conn.execute("DELETE FROM orders WHERE id = 3")
    deadline = time.monotonic() + 10
    while True:
        row = pg.psql(
            "SELECT principals::text || '|' || coalesce(task, '') || '|' || "
            "(tags->>'token_id') FROM guardproxy.audit_events "
            "WHERE tags->>'token_id' = 'jti-audit'",
            dbname=SHOP_DB,
        )
        if row or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert row == "{2}|T-audit|jti-audit"


def _roles_rls_block() -> list[list[str]]:
    """The commands of docs/delegation.md's ``guardproxy roles --rls`` example."""
    doc = (ROOT / "docs" / "delegation.md").read_text()
    [block] = [b for b in re.findall(r"^```sh\n(.*?)```", doc, re.S | re.M) if "--rls" in b]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_the_rls_policy_guardproxy_roles_prints_works_through_the_proxy(
    clean_shop: PgCluster, tmp_path: Path, signing: tuple[SigningKey, Path]
) -> None:
    """docs/delegation.md's commands, run: `guardproxy roles --rls` against the shop,
    its script applied with psql; then a delegated support agent (no row filter in its
    policy: only Postgres's RLS) sees and changes only its principals' orders, while
    analytics (delegation: off) keeps every row."""
    key, public = signing
    pg = clean_shop
    delegated = {"delegation": "required"}
    policies = policies_with(tmp_path / "roles", support=delegated)
    dsn = pg.dsn(user="postgres", dbname=SHOP_DB)
    roles_command, psql_command = _roles_rls_block()
    assert roles_command[:2] == ["guardproxy", "roles"] and roles_command[-2] == ">"
    script = tmp_path / roles_command[-1]
    args = [str(policies) if a == "policies" else dsn if a == "$DSN" else a for a in roles_command]
    printed = subprocess.run(
        [sys.executable, "-m", *args[:-2]], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert printed.returncode == 0, printed.stderr
    script.write_text(printed.stdout)
    assert "CREATE POLICY guard_principals ON orders FOR ALL TO guard_support" in printed.stdout
    assert "::bigint[]" in printed.stdout  # the column's type, read from the database
    psql = [dsn if a == "$DSN" else str(script) if a == script.name else a for a in psql_command]
    applied = subprocess.run(
        [f"{PG_BINDIR}/psql", *psql[1:]], capture_output=True, text=True, timeout=60
    )
    assert applied.returncode == 0, applied.stderr
    everything = "SELECT string_agg(id || ':' || fulfillment_status, ',' ORDER BY id) FROM orders"
    before = pg.psql(everything, dbname=SHOP_DB)
    try:
        with proxy_with(pg, tmp_path, public, support=delegated) as proxy:
            with connect(proxy, token_for(key, ["3"])) as conn:
                assert order_ids(conn) == [4]
                # another customer's order: out of reach, nothing changed
                changed = conn.execute(
                    "UPDATE orders SET fulfillment_status = 'packed' WHERE id = 1"
                ).rowcount
                assert changed == 0
            with connect(proxy, token_for(key, ["1", "4"])) as conn:
                assert order_ids(conn) == [1, 2, 5]
            with (
                connect(proxy) as conn,
                pytest.raises(psycopg.errors.InvalidAuthorizationSpecification),
            ):
                order_ids(conn)  # no token: nothing runs
            with proxy.connect("analytics-1", autocommit=True) as conn:
                assert order_ids(conn) == [1, 2, 3, 4, 5, 6]  # delegation: off keeps its rows
        assert pg.psql(everything, dbname=SHOP_DB) == before
    finally:
        pg.psql(
            "DROP POLICY IF EXISTS guard_principals ON orders; "
            "DROP POLICY IF EXISTS guard_no_delegation ON orders; "
            "ALTER TABLE orders DISABLE ROW LEVEL SECURITY",
            dbname=SHOP_DB,
        )


def _metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    import httpx2
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx2.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _refusals(samples: dict[Any, float], reason: str, at: str) -> float:
    key = (("agent_type", "support"), ("at", at), ("reason", reason))
    return samples.get(("guardproxy_delegation_refusals_total", key), 0.0)


def test_refused_tokens_are_counted_by_reason(
    clean_shop: PgCluster, tmp_path: Path, signing: tuple[SigningKey, Path]
) -> None:
    key, public = signing
    port = free_port()
    expired = token_for(key, ["1"], now=time.time() - 3600, ttl=60)
    with proxy_with(
        clean_shop, tmp_path, public, settings={"metrics_port": port}, support=REQUIRED
    ) as proxy:
        with connect(proxy) as conn:  # no token, delegation: required
            for _ in range(2):
                with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification):
                    conn.execute("SELECT 1")
        with connect(proxy, token_for(key, ["1"])) as conn:
            with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification):
                conn.execute(f"SET guard.token = '{expired}'")
            assert order_ids(conn) == [1, 2]  # the good token still holds
        samples = _metrics(port)
    assert _refusals(samples, "missing", "statement") == 2
    assert _refusals(samples, "expired", "statement") == 1
    assert not [labels for name, labels in samples if "principals" in dict(labels)]


def test_statements_under_a_token_and_refused_logins_are_counted(
    clean_shop: PgCluster, tmp_path: Path, signing: tuple[SigningKey, Path]
) -> None:
    key, public = signing
    port = free_port()
    forged_key = SigningKey("EdDSA", ed25519.Ed25519PrivateKey.generate(), None)
    forged = mint(forged_key, agent="support-7", principals=["1", "2", "3"], issuer=ISSUER)
    with proxy_with(
        clean_shop, tmp_path, public, settings={"metrics_port": port}, support=REQUIRED
    ) as proxy:
        for _ in range(2):
            with pytest.raises(psycopg.OperationalError):
                connect(proxy, forged)
        with connect(proxy, token_for(key, ["1"])) as conn:
            for _ in range(3):
                assert order_ids(conn) == [1, 2]
            with conn.cursor() as cur:  # extended protocol: Parse, Bind, Execute
                cur.execute("SELECT id FROM orders WHERE id = %s", (1,), prepare=True)
                cur.execute("SELECT id FROM orders WHERE id = %s", (2,), prepare=True)
            assert conn.execute("DELETE FROM orders WHERE id = 2").rowcount == 1  # soft delete
        with (
            connect(proxy) as conn,
            pytest.raises(psycopg.errors.InvalidAuthorizationSpecification),
        ):
            conn.execute("SELECT 1")  # refused: not a statement under a token
        samples = _metrics(port)
    labels = (("agent", "*"), ("agent_type", "support"), ("issuer", ISSUER))
    assert samples["guardproxy_delegated_statements_total", labels] == 6
    assert _refusals(samples, "signature", "login") == 2
