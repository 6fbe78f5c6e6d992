"""An outsider's attack on delegation tokens (issue 16) and on the agent side of the MCP
front door (issue 17), kept as tests.

Promises attacked (docs/delegation.md, docs/mcp.md, docs/security.md): an agent of a
type with ``delegation: required`` sees and changes only its token's principals' rows,
through the policy's row filters (``orders``) and through Postgres row-level security
fed by ``guard.principals`` (``customers``: RLS for ``guard_support`` on ``id``), so each
layer can be judged alone. Every attack is judged by effect: the ids that reached the
client compared with the principals' rows as the superuser reads them, and the rows in
the database unchanged.

Covered:

* the baseline (a token's rows through both layers, nothing without a token);
* Postgres-side settings an agent might reach: ``SET`` / ``SET LOCAL`` / ``RESET`` of
  guard.* in every spelling (quoted, upper case, split), ``set_config`` (qualified,
  upper case, computed name), ``UPDATE pg_settings``, the function-call protocol,
  ``DISCARD ALL`` / ``RESET ALL``, a rolled-back ``SET LOCAL``;
* startup parameters: ``options`` with ``-c guard.principals``, upper case, ``--``
  form, and a guard.* key sent as a startup parameter of its own;
* tokens: widened claims under the old signature (principals, sub, exp, aud, iss),
  ``alg: none`` in several spellings, HS256 signed with the issuer's public key
  (algorithm confusion), embedded ``jwk`` / ``jku`` headers, expired, not yet valid,
  too long-lived, another audience, another issuer, another agent's token at login and
  by SET, a token inside a transaction, in a comment, next to other statements;
* pipelines: a token changed between Parse, Bind and Execute of a prepared statement,
  a revoked token's prepared statement and WITH HOLD cursor used under a new token;
* revocation by principal reaching a second instance mid-pipeline; the audit's
  principals and token id;
* narrowing: tables and operations a token leaves out, through joins, subqueries and
  writable CTEs;
* MCP over HTTP with a delegation token: the same narrowing (row filter and RLS),
  guard.* settings through tool calls, SQL injection through parameters, wrong types,
  huge input, non-JSON bodies, a forged / widened bearer, another task than the
  token's, many concurrent calls; MCP over stdio for a ``required`` type without a
  token, and with ``PGOPTIONS`` naming principals.
* pooled servers: sessions of different tokens taking turns on one server connection
  (simple and extended protocol, psycopg, an optional type without a token, RLS-only
  writes, an MCP stdio agent);
* tokens as passwords (SCRAM mode): bad tokens, another agent's token, an agent with a
  password of its own, password and options tokens together; the admin console and a
  proxy without policies reached with a JWS-shaped password; a session logged in by a
  revoked token shedding it (RESET, DISCARD ALL) to declare principals;
* reads around the row filter: qualified and quoted names, ONLY, CTEs, unions,
  subqueries, LATERAL, TABLESAMPLE, COPY, cursors, PREPARE, ``query_to_xml`` and kin;
* revocation by principal for tokens naming several principals, integer principals.

Findings, fixed (their tests now pass): an extended-protocol statement on a freshly lent
server ran under the ``guard.*`` values the previous session left there, so RLS saw
another token's principals; and a login whose password was shaped like a token was
never verified where no policy binds it (the admin console, a proxy without policies).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import jwt
import psycopg
import pytest
import shop
import yaml
from cryptography.hazmat.primitives import serialization
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from pgcluster import PgCluster, free_port, wait_for_port
from proofkit import policies_with
from shop import ROOT, SHOP_DB, ShopProxy, launch_proxy
from test_attack_relay import (
    SYNC,
    Wire,
    bind,
    close,
    errors,
    execute,
    firsts,
    function_call,
    messages,
    parse,
    summary,
)

from guardproxy.delegation.mint import SigningKey, generate_key, mint
from guardproxy.delegation.postgres import rls_policy_sql

pytestmark = pytest.mark.timeout(120)

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline

ISSUER = "shop-app"
AGENT = "support-7"
WAIT = 5.0

POLICY = {
    "delegation": "required",
    "row_filters": {"orders": "customer_id = ANY({principals})"},
}
# the orders of each customer in the sample data (the row-filter layer)
ORDERS_OF = {"1": [1, 2], "2": [3, 6], "3": [4], "4": [5]}

ORDERS_SQL = "SELECT id FROM orders WHERE id > 0 ORDER BY id"
CUSTOMERS_SQL = "SELECT id FROM customers ORDER BY id"  # RLS layer only


def orders_of(*principals: str) -> list[int]:
    return sorted(i for p in principals for i in ORDERS_OF.get(p, []))


def customers_of(*principals: str) -> list[int]:
    return sorted(int(p) for p in principals)


# ---------------------------------------------------------------- superuser view


def su(pg: PgCluster, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(
        pg.dsn("postgres", dbname=SHOP_DB), autocommit=True, connect_timeout=int(WAIT)
    ) as conn:
        cur = conn.execute(sql, args or None)
        return cur.fetchall() if cur.description else []


def shop_rows(pg: PgCluster) -> Any:
    return su(
        pg,
        "SELECT (SELECT json_agg(o ORDER BY o.id) FROM orders o), "
        "(SELECT json_agg(c ORDER BY c.id) FROM customers c), "
        "(SELECT count(*) FROM order_state_log)",
    )


# ---------------------------------------------------------------- fixtures


class Env:
    def __init__(self, proxy: ShopProxy, key: SigningKey, public: Path, work: Path) -> None:
        self.proxy = proxy
        self.key = key
        self.public = public
        self.work = work

    def token(self, principals: list[str], agent: str = AGENT, **kw: Any) -> str:
        return mint(self.key, agent=agent, principals=principals, issuer=ISSUER, **kw)

    def wire(self, token: str | None, agent: str = AGENT, **params: str) -> Wire:
        if token is not None:
            params = {"options": f"-c guard.token={token}", **params}
        return Wire(self.proxy.port, agent, **params)

    def admin(self, sql: str) -> None:
        with psycopg.connect(
            f"postgresql://admin@127.0.0.1:{self.proxy.port}/guardproxy",
            autocommit=True,
            connect_timeout=int(WAIT),
        ) as conn:
            conn.execute(sql)


def issuers(public: Path) -> list[dict[str, Any]]:
    return [{"issuer": ISSUER, "key_file": str(public), "audiences": ["guardproxy"]}]


@pytest.fixture(scope="module")
def rls_shop(shop_db: PgCluster, shop_baseline: Any) -> Iterator[PgCluster]:
    """The shop with RLS on customers for guard_support (ids = principals); analytics
    and fulfillment keep their rows."""
    shop_db.psql(
        rls_policy_sql(
            "customers",
            "id",
            ["guard_support"],
            column_type="bigint",
            other_roles=["guard_analytics", "guard_fulfillment"],
        ),
        dbname=SHOP_DB,
    )
    yield shop_db
    shop.restore_shop(shop_db)


@pytest.fixture(scope="module")
def env(rls_shop: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("attack-tokens")
    private, public = generate_key("EdDSA")
    (work / "shop.pub").write_bytes(public)
    (work / "shop.key").write_bytes(private)
    key = SigningKey("EdDSA", serialization.load_pem_private_key(private, None), None)
    policies = policies_with(work, support=POLICY)
    with launch_proxy(
        rls_shop,
        work / "guardproxy.log",
        policies=policies,
        delegation_issuers=json.dumps(issuers(work / "shop.pub")),
        delegation_revocations_refresh=1,
        admin_users="admin",
    ) as proxy:
        yield Env(proxy, key, work / "shop.pub", work)
        assert "Traceback" not in proxy.log(), proxy.log()[-4000:]


@pytest.fixture
def shop_state(env: Env, rls_shop: PgCluster, request: pytest.FixtureRequest) -> Iterator[Any]:
    """The rows before the test; the proxy's log shown when it failed."""
    before = shop_rows(rls_shop)
    since = len(env.proxy.log())
    yield before
    shop.dump_log_on_failure(request, env.proxy, since)


def ids(msgs: Any) -> list[int]:
    return sorted(int(x) for x in firsts(msgs) if x is not None)


def seen(conn: Wire, sql: str) -> list[int]:
    """The ids a read brought back ([] when it was refused)."""
    return ids(conn.q(sql))


# ================================================================ baseline


def test_a_token_gives_its_principals_rows_through_both_layers(env: Env, shop_state: Any):
    conn = env.wire(env.token(["1"]))
    try:
        assert seen(conn, ORDERS_SQL) == orders_of("1")
        assert seen(conn, CUSTOMERS_SQL) == customers_of("1")
    finally:
        conn.close()
    conn = env.wire(None)
    try:
        got = conn.q(CUSTOMERS_SQL)
        assert errors(got) == ["28000"] and not ids(got)
    finally:
        conn.close()


# ================================================================ guard.* from SQL


SETTING_ATTACKS = [
    "SET \"GUARD.PRINCIPALS\" = '1,2,3,4'",
    "SET \"Guard.Principals\" TO '1,2,3,4'",
    "SET SESSION \"GUARD.principals\" = '1,2,3,4'",
    'SET "guard"."principals" = \'1,2,3,4\'',
    "SET guard.\"PRINCIPALS\" = '1,2,3,4'",
    "SELECT set_config('GUARD.PRINCIPALS', '1,2,3,4', false)",
    "SELECT pg_catalog.set_config('guard.principals', '1,2,3,4', false)",
    "SELECT set_config('guard.principals' || '', '1,2,3,4', false)",
    "SELECT set_config(lower('GUARD.PRINCIPALS'), '1,2,3,4', false)",
    "SELECT * FROM set_config('guard.principals', '1,2,3,4', false)",
    "SELECT id FROM customers WHERE set_config('guard.principals', '1,2,3,4', false) <> ''",
    "UPDATE pg_settings SET setting = '1,2,3,4' WHERE name = 'guard.principals'",
    "SET guard.principals = '1,2,3,4'; SELECT 1",
    "SELECT 1; SET guard.principals = '1,2,3,4'",
    "RESET guard.principals; SET \"GUARD.PRINCIPALS\" = '1,2,3,4'",
    "ALTER ROLE guard_support SET guard.principals = '1,2,3,4'",
    "SET ROLE app_owner",
    "SELECT set_config(new_value => '1,2,3,4', setting_name => 'guard.principals', "
    "is_local => false)",
    "SELECT set_config(is_local => false, setting_name => 'guard.principals', "
    "new_value => '1,2,3,4')",
    "SELECT set_config('guard.principals', new_value => '1,2,3,4', is_local => false)",
    "SELECT set_config(x, y, false) FROM (VALUES ('guard.principals', '1,2,3,4')) v(x, y)",
    "SELECT set_config(E'guard\\x2eprincipals', '1,2,3,4', false)",
    "SELECT set_config(U&'guard\\002eprincipals', '1,2,3,4', false)",
    "SELECT set_config($$guard.principals$$, '1,2,3,4', false)",
    "SELECT set_config('guard.principals'::text, '1,2,3,4', false)",
    "SELECT set_config(('guard.principals'), '1,2,3,4', false)",
    "SELECT set_config(' guard.principals', '1,2,3,4', false)",
    "SELECT set_config('guard.principals ', '1,2,3,4', false)",
    "DO $$BEGIN PERFORM set_config('guard.principals', '1,2,3,4', false); END$$",
    "PREPARE sp(text, text) AS SELECT set_config($1, $2, false); "
    "EXECUTE sp('guard.principals', '1,2,3,4')",
    "SELECT current_setting('guard.principals') FROM set_config('guard.principals', "
    "'1,2,3,4', false) AS s",
    "VALUES (set_config('guard.principals', '1,2,3,4', false))",
    "SELECT 1 WHERE set_config('guard.principals', '1,2,3,4', false) IS NOT NULL",
    "SELECT 1 ORDER BY set_config('guard.principals', '1,2,3,4', false)",
    "SET SESSION AUTHORIZATION postgres",
]


@pytest.mark.parametrize("attack", SETTING_ATTACKS)
def test_no_sql_spelling_widens_guard_principals(env: Env, shop_state: Any, attack: str):
    conn = env.wire(env.token(["3"]))
    try:
        conn.q(attack)
        after = [seen(conn, CUSTOMERS_SQL), seen(conn, ORDERS_SQL)]
        # in a transaction too: the proxy sets guard.* only at the start of one
        conn.q("BEGIN")
        conn.q(attack)
        inside = [seen(conn, CUSTOMERS_SQL), seen(conn, ORDERS_SQL)]
        conn.q("COMMIT")
        again = [seen(conn, CUSTOMERS_SQL), seen(conn, ORDERS_SQL)]
    finally:
        conn.close()
    for got in (after, inside, again):
        assert set(got[0]) <= set(customers_of("3")), (attack, got)
        assert set(got[1]) <= set(orders_of("3")), (attack, got)
    assert again == [customers_of("3"), orders_of("3")], (attack, again)  # the session works


def test_extended_protocol_set_config_and_case_variants_do_not_widen(env: Env, shop_state: Any):
    conn = env.wire(env.token(["3"]))
    try:
        for sql in (
            "SET \"GUARD.PRINCIPALS\" = '1,2,3,4'",
            "SELECT set_config($1, $2, false)",
            "SELECT set_config('guard.principals', $1, false)",
        ):
            conn.round(
                parse(b"", sql, (25, 25) if "$2" in sql else (25,) if "$1" in sql else ()),
                bind(
                    b"",
                    b"",
                    *(
                        [b"guard.principals", b"1,2,3,4"]
                        if "$2" in sql
                        else [b"1,2,3,4"]
                        if "$1" in sql
                        else []
                    ),
                ),
                execute(),
                SYNC,
            )
        # the pipeline: a setting and the read in one round, before Sync
        got = conn.round(
            parse(b"", "SELECT set_config('guard.principals', '1,2,3,4', false)"),
            bind(b"", b""),
            execute(),
            parse(b"", CUSTOMERS_SQL),
            bind(b"", b""),
            execute(),
            SYNC,
        )
        assert set(ids(got)) <= set(customers_of("3")), summary(got)
        assert seen(conn, CUSTOMERS_SQL) == customers_of("3")
    finally:
        conn.close()


def test_the_function_call_protocol_cannot_call_set_config(env: Env, shop_state: Any):
    conn = env.wire(env.token(["3"]))
    try:
        got = conn.round(function_call(2078, b"guard.principals", b"1,2,3,4", b"f"))
        assert errors(got), summary(got)
        assert seen(conn, CUSTOMERS_SQL) == customers_of("3")
    finally:
        conn.close()


@pytest.mark.parametrize(
    "clear",
    [
        "RESET ALL",
        "DISCARD ALL",
        "RESET guard.principals",
        "RESET guard.token",
        'RESET "GUARD.PRINCIPALS"',
    ],
)
def test_clearing_the_settings_gives_fewer_rows_never_more(env: Env, shop_state: Any, clear: str):
    conn = env.wire(env.token(["2"]))
    try:
        conn.q(clear)
        got = [seen(conn, CUSTOMERS_SQL), seen(conn, ORDERS_SQL)]
        conn.q("BEGIN")
        conn.q(clear)
        inside = [seen(conn, CUSTOMERS_SQL), seen(conn, ORDERS_SQL)]
        conn.q("ROLLBACK")
    finally:
        conn.close()
    for rows in (got, inside):
        assert set(rows[0]) <= set(customers_of("2")), (clear, rows)
        assert set(rows[1]) <= set(orders_of("2")), (clear, rows)


def test_set_local_and_rollback_leave_the_tokens_principals(env: Env, shop_state: Any):
    conn = env.wire(env.token(["4"]))
    try:
        conn.q("BEGIN")
        conn.q("SET LOCAL guard.principals = '1,2,3,4'")
        conn.q("SET LOCAL guard.token = 'x'")
        inside = seen(conn, CUSTOMERS_SQL)
        conn.q("ROLLBACK")
        conn.q("BEGIN")
        conn.q("SET LOCAL \"GUARD.PRINCIPALS\" = '1,2,3,4'")
        inside2 = seen(conn, CUSTOMERS_SQL)
        conn.q("ROLLBACK")
        after = seen(conn, CUSTOMERS_SQL)
    finally:
        conn.close()
    assert set(inside) <= {4} and set(inside2) <= {4}
    assert after == [4]


# ================================================================ startup parameters


@pytest.mark.parametrize(
    "params",
    [
        {"options": "-c guard.principals=1,2,3,4"},
        {"options": "-c GUARD.PRINCIPALS=1,2,3,4"},
        {"options": "--guard.principals=1,2,3,4"},
        {"options": "-cguard.principals=1,2,3,4"},
        {"guard.principals": "1,2,3,4"},
        {"GUARD.PRINCIPALS": "1,2,3,4"},
        {"Guard.Principals": "1,2,3,4"},
    ],
    ids=[
        "options",
        "options-upper",
        "options-dashdash",
        "options-joined",
        "param",
        "param-upper",
        "param-mixed",
    ],
)
def test_startup_parameters_do_not_widen(env: Env, shop_state: Any, params: dict[str, str]):
    token = env.token(["3"])
    if "options" in params:
        params = {"options": params["options"] + f" -c guard.token={token}"}
    else:
        params = {**params, "options": f"-c guard.token={token}"}
    try:
        conn = Wire(env.proxy.port, AGENT, **params)
    except (ConnectionError, TimeoutError):
        return  # refused at login: nothing to see
    try:
        customers = seen(conn, CUSTOMERS_SQL)
        orders = seen(conn, ORDERS_SQL)
        shown = conn.q("SELECT current_setting('guard.principals', true)")
    finally:
        conn.close()
    assert customers == [3], customers
    assert orders == orders_of("3"), orders
    assert set(firsts(shown)) <= {"3", None}, firsts(shown)


def test_startup_principals_without_token_see_nothing(env: Env, shop_state: Any):
    for params in (
        {"options": "-c guard.principals=1,2,3,4"},
        {"GUARD.PRINCIPALS": "1,2,3,4"},
    ):
        try:
            conn = Wire(env.proxy.port, AGENT, **params)
        except (ConnectionError, TimeoutError):
            continue
        try:
            assert seen(conn, CUSTOMERS_SQL) == []
            assert seen(conn, ORDERS_SQL) == []
        finally:
            conn.close()


# ================================================================ tampered tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _parts(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    header, payload, signature = token.split(".")
    return (
        json.loads(jwt.utils.base64url_decode(header)),
        json.loads(jwt.utils.base64url_decode(payload)),
        signature,
    )


def _assemble(header: dict[str, Any], payload: dict[str, Any], signature: str) -> str:
    return ".".join(
        (_b64(json.dumps(header).encode()), _b64(json.dumps(payload).encode()), signature)
    )


def bad_tokens(env: Env) -> dict[str, str]:
    good = env.token(["3"])
    header, payload, signature = _parts(good)
    now = int(time.time())
    out: dict[str, str] = {}
    for name, change in {
        "principals": {"principals": ["1", "2", "3", "4"]},
        "sub-glob": {"sub": "*"},
        "exp": {"exp": now + 86400 * 365},
        "aud": {"aud": ["other", "guardproxy"]},
        "iss": {"iss": "shop-app "},
        "narrow-dropped": {},
    }.items():
        widened = {**payload, **change}
        if name == "narrow-dropped":
            widened["jti"] = "x" + widened["jti"]
        out[f"widened-{name}"] = _assemble(header, widened, signature)
    for alg in ("none", "None", "NONE", "nOnE"):
        wide = {**payload, "principals": ["1", "2", "3", "4"]}
        out[f"alg-{alg}"] = _assemble({"alg": alg, "typ": "JWT"}, wide, "")
        out[f"alg-{alg}-sig"] = _assemble({"alg": alg, "typ": "JWT"}, wide, signature)
    # HS256 keyed with the issuer's public key (algorithm confusion)
    pem = env.public.read_bytes()
    wide = {**payload, "principals": ["1", "2", "3", "4"]}
    signing = f"{_b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(wide).encode())}"
    import hashlib
    import hmac

    for secret_name, secret in {"pem": pem, "pem-stripped": pem.strip()}.items():
        mac = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
        out[f"confusion-{secret_name}"] = f"{signing}.{_b64(mac)}"
    # a key of the attacker's own, announced in the header
    private, _attacker_pub = generate_key("EdDSA")
    attacker = serialization.load_pem_private_key(private, None)
    jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(attacker.public_key()))
    for hname, extra in {
        "jwk": {"jwk": jwk},
        "jku": {"jku": "http://127.0.0.1:1/jwks.json"},
        "x5u": {"x5u": "http://127.0.0.1:1/cert.pem"},
        "kid-path": {"kid": "../../../../dev/null"},
    }.items():
        out[f"header-{hname}"] = jwt.encode(wide, attacker, algorithm="EdDSA", headers=extra)
    # the issuer's real key, wrong claims
    out["expired"] = env.token(["1", "2", "3", "4"], now=time.time() - 3600, ttl=60)
    out["not-yet-valid"] = env.token(["1", "2", "3", "4"], now=time.time() + 600, ttl=60)
    out["too-long"] = env.token(["1", "2", "3", "4"], ttl=86400 * 30)
    out["other-audience"] = env.token(["1", "2", "3", "4"], audience="other")
    out["other-issuer"] = mint(
        env.key, agent=AGENT, principals=["1", "2", "3", "4"], issuer="other-app"
    )
    out["other-agent"] = env.token(["1", "2", "3", "4"], agent="support-8")
    out["other-agent-glob"] = env.token(["1", "2", "3", "4"], agent="support-8*")
    nbf = jwt.decode(env.token(["1"]), options={"verify_signature": False})
    nbf.update(nbf=int(time.time()) + 600, principals=["1", "2", "3", "4"])
    out["nbf-future"] = jwt.encode(nbf, env.key.key, algorithm="EdDSA")
    out["truncated"] = good[:-10]
    out["two-tokens"] = good + "." + good
    out["whitespace"] = good + " "
    out["bad-narrow"] = env.token(
        ["1", "2", "3", "4"], narrow={"tables": ["orders"], "widen": True}
    )
    return out


def test_bad_tokens_at_login_and_by_set_change_nothing(env: Env, shop_state: Any, rls_shop):
    bad = bad_tokens(env)
    accepted_at_login = []
    logged_in = []
    for name, token in bad.items():
        try:
            conn = env.wire(token)
        except (ConnectionError, TimeoutError):
            continue
        logged_in.append(name)
        try:
            got = [seen(conn, CUSTOMERS_SQL), seen(conn, ORDERS_SQL)]
        finally:
            conn.close()
        if not set(got[0]) <= {3} or not set(got[1]) <= set(orders_of("3")):
            accepted_at_login.append((name, got))
    conn = env.wire(env.token(["3"]))
    accepted_by_set = []
    set_ok = []
    try:
        for name, token in bad.items():
            if not errors(conn.q(f"SET guard.token = '{token}'")):
                set_ok.append(name)
            got = [seen(conn, CUSTOMERS_SQL), seen(conn, ORDERS_SQL)]
            if not set(got[0]) <= {3} or not set(got[1]) <= set(orders_of("3")):
                accepted_by_set.append((name, got))
    finally:
        conn.close()
    assert accepted_at_login == []
    assert accepted_by_set == []
    assert set(logged_in) <= {"whitespace"}, logged_in
    assert set(set_ok) <= {"whitespace"}, set_ok
    assert shop_rows(rls_shop) == shop_state


def test_a_token_of_another_agent_or_type_is_refused(env: Env, shop_state: Any):
    token7 = env.token(["1", "2", "3", "4"])  # support-7's
    for agent in ("support-8", "support-70", "analytics-1", "fulfillment-1"):
        try:
            conn = env.wire(token7, agent=agent)
        except (ConnectionError, TimeoutError):
            continue
        try:
            if agent.startswith("support"):
                assert seen(conn, CUSTOMERS_SQL) == []
                assert seen(conn, ORDERS_SQL) == []
            conn.q(f"SET guard.token = '{token7}'")
            if agent.startswith("support"):
                assert seen(conn, CUSTOMERS_SQL) == []
        finally:
            conn.close()


def test_a_token_cannot_travel_in_a_comment_a_transaction_or_a_batch(env: Env, shop_state: Any):
    wide = env.token(["1", "2", "3", "4"])
    conn = env.wire(env.token(["3"]))
    try:
        got = {
            "comment": conn.q(f"/* token='{wide}' */ {CUSTOMERS_SQL}"),
            "comment-guard": conn.q(f"/* guard.token='{wide}' */ {CUSTOMERS_SQL}"),
            "batch": conn.q(f"SET guard.token = '{wide}'; {CUSTOMERS_SQL}"),
            "batch-after": conn.q(f"{CUSTOMERS_SQL}; SET guard.token = '{wide}'"),
            "set-config": conn.q(f"SELECT set_config('guard.token', '{wide}', false)"),
        }
        after_batch = seen(conn, CUSTOMERS_SQL)
        conn.q("BEGIN")
        in_tx = conn.q(f"SET guard.token = '{wide}'")
        in_tx_read = seen(conn, CUSTOMERS_SQL)
        conn.q("COMMIT")
        after_tx = seen(conn, CUSTOMERS_SQL)
    finally:
        conn.close()
    for name, msgs in got.items():
        assert set(ids(msgs)) <= {3}, (name, summary(msgs))
    assert errors(in_tx), summary(in_tx)
    assert set(in_tx_read) <= {3}
    assert after_batch == [3] and after_tx == [3]
    assert wide not in env.proxy.log()


# ================================================================ pipelines


def test_a_token_changed_between_parse_bind_and_execute(env: Env, shop_state: Any):
    """A named statement parsed under token {1}, the token swapped to {3}, then bound and
    executed (several rounds and one round): rows only of the token in force."""
    conn = env.wire(env.token(["1"]))
    token3 = env.token(["3"])
    try:
        conn.round(parse(b"so", ORDERS_SQL), parse(b"sc", CUSTOMERS_SQL), SYNC)
        conn.q(f"SET guard.token = '{token3}'")
        later = conn.round(bind(b"", b"so"), execute(), bind(b"", b"sc"), execute(), SYNC)
        # one round: Bind under {1}, SET guard.token, Execute
        conn.q(f"SET guard.token = '{env.token(['1'])}'")
        mixed = conn.round(
            bind(b"p1", b"so"),
            parse(b"", f"SET guard.token = '{token3}'"),
            bind(b"", b""),
            execute(),
            execute(b"p1"),
            SYNC,
        )
        seen_now = seen(conn, ORDERS_SQL)
    finally:
        conn.close()
    assert ids(later) == sorted([*orders_of("3"), 3]), summary(later)
    # whichever token the round ran under, never the union
    mixed_ids = set(ids(mixed))
    assert mixed_ids <= set(orders_of("1")) or mixed_ids <= set(orders_of("3")), summary(mixed)
    assert set(seen_now) in (set(orders_of("1")), set(orders_of("3")))


def test_a_revoked_tokens_statement_and_hold_cursor_do_not_outlive_it(env: Env, shop_state: Any):
    """Token {1} prepares a statement and opens a WITH HOLD cursor; the token is revoked;
    the session presents token {3}: neither the statement nor the cursor shows {1}'s rows."""
    jti = f"atk-revoked-{time.time_ns()}"
    conn = env.wire(env.token(["1"], token_id=jti))
    try:
        conn.round(parse(b"old", ORDERS_SQL), SYNC)
        conn.q("BEGIN")
        conn.q(f"DECLARE c_old CURSOR WITH HOLD FOR {ORDERS_SQL}")
        conn.q(f"DECLARE c_cust CURSOR WITH HOLD FOR {CUSTOMERS_SQL}")
        conn.q("COMMIT")
        env.admin(f"REVOKE TOKEN '{jti}' REASON 'attack test'")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not errors(conn.q("SELECT 1")):
            time.sleep(0.2)
        assert errors(conn.q("SELECT 1")) == ["28000"]
        direct = conn.round(bind(b"", b"old"), execute(), SYNC)
        fetched_revoked = conn.q("FETCH ALL FROM c_old")
        conn.q(f"SET guard.token = '{env.token(['3'])}'")
        stale = conn.round(bind(b"", b"old"), execute(), SYNC)
        fetched = conn.q("FETCH ALL FROM c_old")
        fetched_cust = conn.q("FETCH ALL FROM c_cust")
    finally:
        conn.close()
    assert ids(direct) == [] and ids(fetched_revoked) == [], summary(direct)
    assert set(ids(stale)) <= set(orders_of("3")), summary(stale)
    assert set(ids(fetched)) <= set(orders_of("3")), summary(fetched)
    assert set(ids(fetched_cust)) <= {3}, summary(fetched_cust)


def test_a_revocation_by_principal_reaches_a_second_instance_mid_pipeline(
    env: Env, shop_state: Any, rls_shop: PgCluster
):
    work = env.work / "second"
    work.mkdir(exist_ok=True)
    policies = policies_with(work, support=POLICY)
    principal = "4"
    with launch_proxy(
        rls_shop,
        work / "guardproxy.log",
        policies=policies,
        delegation_issuers=json.dumps(issuers(env.public)),
        delegation_revocations_refresh=1,
    ) as two:
        conn = Wire(two.port, AGENT, options=f"-c guard.token={env.token([principal])}")
        try:
            conn.round(parse(b"s", CUSTOMERS_SQL), SYNC)
            assert ids(conn.round(bind(b"", b"s"), execute(), SYNC)) == [4]
            time.sleep(1.1)  # the revocation covers tokens issued before it
            env.admin(f"REVOKE TOKENS FOR PRINCIPAL '{principal}' ISSUER '{ISSUER}'")
            try:
                deadline = time.monotonic() + 15
                got = conn.round(bind(b"", b"s"), execute(), SYNC)
                while ids(got) and time.monotonic() < deadline:
                    time.sleep(0.2)
                    got = conn.round(bind(b"", b"s"), execute(), SYNC)
                assert ids(got) == [] and "revoked" in " ".join(messages(got)), summary(got)
                assert ids(conn.q(CUSTOMERS_SQL)) == []
            finally:
                env.admin(f"UNREVOKE TOKENS FOR PRINCIPAL '{principal}' ISSUER '{ISSUER}'")
        finally:
            conn.close()


def test_the_audit_names_the_tokens_principals(env: Env, rls_shop: PgCluster, shop_state: Any):
    jti = f"atk-audit-{time.time_ns()}"
    conn = env.wire(env.token(["2"], token_id=jti, task="atk-audit"))
    try:
        got = conn.q("UPDATE orders SET fulfillment_status = 'packed' WHERE id IN (3, 4, 5)")
        assert not errors(got), messages(got)
    finally:
        conn.close()
    try:
        deadline = time.monotonic() + 10
        rows: list[tuple[Any, ...]] = []
        while not rows and time.monotonic() < deadline:
            rows = su(
                rls_shop,
                "SELECT principals, tags->>'token_id' FROM guardproxy.audit_events "
                "WHERE tags->>'token_id' = %s",
                jti,
            )
            time.sleep(0.1)
        assert rows and all(r == (["2"], jti) for r in rows), rows
        # only customer 2's order changed (3 was packed already: the row filter kept 4, 5)
        status = dict(su(rls_shop, "SELECT id, fulfillment_status FROM orders"))
        assert status[4] == "pending" and status[5] == "pending"
    finally:
        su(rls_shop, "UPDATE orders SET fulfillment_status = 'packed' WHERE id = 3")
        su(
            rls_shop,
            "DELETE FROM order_state_log WHERE idempotency_key NOT LIKE 'seed-%' OR idempotency_key IS NULL",
        )


# ================================================================ writes and narrowing


WRITE_ATTACKS = [
    "UPDATE orders SET fulfillment_status = 'returned' WHERE customer_id <> 3",
    "UPDATE orders SET fulfillment_status = 'returned' WHERE id = 1 OR true",
    "DELETE FROM orders WHERE id IN (1, 2, 3, 5, 6)",
    "WITH x AS (UPDATE orders SET fulfillment_status = 'returned' WHERE id = 1 RETURNING id) "
    "SELECT id FROM x",
    "UPDATE orders o SET fulfillment_status = 'returned' FROM customers c "
    "WHERE c.id = o.customer_id AND c.id = 1",
]


@pytest.mark.parametrize("attack", WRITE_ATTACKS)
def test_writes_reach_only_the_tokens_principals(
    env: Env, rls_shop: PgCluster, shop_state: Any, attack: str
):
    conn = env.wire(env.token(["3"], task="atk-write"))
    try:
        got = conn.q(attack)
    finally:
        conn.close()
    after = su(
        rls_shop,
        "SELECT id FROM orders WHERE fulfillment_status = 'returned' OR deleted_at IS NOT NULL",
    )
    logged = su(rls_shop, "SELECT order_id FROM order_state_log WHERE changed_by = 'atk'")
    try:
        assert all(r[0] == 4 for r in after), (attack, after, summary(got))
        assert all(r[0] == 4 for r in logged), (attack, logged)
    finally:
        su(
            rls_shop,
            "UPDATE orders SET fulfillment_status = CASE id WHEN 1 THEN 'delivered' WHEN 2 THEN "
            "'shipped' WHEN 3 THEN 'packed' WHEN 6 THEN 'cancelled' ELSE 'pending' END, "
            "deleted_at = NULL, deleted_by = NULL, delete_reason = NULL",
        )
        su(
            rls_shop,
            "DELETE FROM order_state_log WHERE idempotency_key IS NULL OR idempotency_key NOT LIKE 'seed-%'",
        )


NARROW_ATTACKS = [
    "SELECT id FROM customers ORDER BY id",
    "SELECT o.id FROM orders o JOIN customers c ON c.id = o.customer_id",
    "SELECT id FROM orders WHERE customer_id IN (SELECT id FROM customers)",
    "SELECT (SELECT name FROM customers LIMIT 1)",
    "TABLE customers",
    "UPDATE orders SET fulfillment_status = 'returned' WHERE id = 4",
    "WITH x AS (UPDATE orders SET fulfillment_status = 'returned' WHERE id = 4 RETURNING id) "
    "SELECT id FROM x",
    "DELETE FROM orders WHERE id = 4",
    "SELECT id FROM order_state_log",
]


@pytest.mark.parametrize("attack", NARROW_ATTACKS)
def test_a_narrowed_token_reaches_nothing_it_left_out(
    env: Env, rls_shop: PgCluster, shop_state: Any, attack: str
):
    token = env.token(["3", "1"], narrow={"tables": {"orders": ["select"]}})
    conn = env.wire(token)
    try:
        got = conn.q(attack)
        assert seen(conn, ORDERS_SQL) == orders_of("1", "3")  # what it may do still works
    finally:
        conn.close()
    assert errors(got) == ["42501"], summary(got)
    assert shop_rows(rls_shop) == shop_state


# ================================================================ MCP over HTTP


class Mcp:
    def __init__(self, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.port = port
        self.proc = proc
        self.log_path = log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def mcp_http(env: Env) -> Iterator[Mcp]:
    settings = env.work / "guardproxy.yaml"
    settings.write_text(yaml.safe_dump({"delegation_issuers": issuers(env.public)}))
    port = free_port()
    log_path = env.work / "mcp.log"
    args = [
        "guardproxy", "mcp", "http", "--config", str(settings),
        "--proxy", f"postgresql://127.0.0.1:{env.proxy.port}/{SHOP_DB}",
        "--policies", str(env.work / "policies"), "--port", str(port),
        "--log-level", "info",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    try:
        wait_for_port("127.0.0.1", port, timeout=30)
        yield Mcp(port, proc, log_path)
    finally:
        proc.terminate()
        proc.wait(15)


@contextlib.asynccontextmanager
async def mcp_client(server: Mcp, token: str) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        Client(streamable_http_client(server.url, http_client=http)) as client,
    ):
        yield client


async def tool(client: Client, name: str, **arguments: Any) -> tuple[bool, str, Any]:
    result = await client.call_tool(name, arguments)
    text = "".join(getattr(block, "text", "") for block in result.content)
    return bool(result.is_error), text, result.structured_content


def mcp_ids(data: Any) -> list[int]:
    if not isinstance(data, dict):
        return []
    return sorted(int(r[0]) for r in data.get("rows") or [] if r and r[0] is not None)


def test_mcp_http_narrows_like_the_wire(env: Env, mcp_http: Mcp, shop_state: Any, rls_shop):
    token = env.token(["2"])

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with mcp_client(mcp_http, token) as client:
            for name, sql in {"orders": ORDERS_SQL, "customers": CUSTOMERS_SQL}.items():
                out[name] = await tool(client, "query", sql=sql)
            for i, attack in enumerate(SETTING_ATTACKS):
                out[f"attack-{i}"] = await tool(client, "query", sql=attack)
                out[f"after-{i}"] = await tool(client, "query", sql=CUSTOMERS_SQL)
            out["param-inject"] = await tool(
                client,
                "query",
                sql="SELECT id FROM customers WHERE id::text = $1 OR name = $2",
                params=["1' OR '1'='1", "x') OR true --"],
            )
            out["param-setconfig"] = await tool(
                client,
                "query",
                sql="SELECT set_config($1, $2, false)",
                params=["guard.principals", "1,2,3,4"],
            )
            out["multi"] = await tool(
                client, "query", sql=f"SET \"GUARD.PRINCIPALS\" = '1,2,3,4'; {CUSTOMERS_SQL}"
            )
            out["commit-escape"] = await tool(
                client, "query", sql=f"COMMIT; SET guard.principals = '1,2,3,4'; {CUSTOMERS_SQL}"
            )
            out["end"] = await tool(client, "query", sql=CUSTOMERS_SQL)
        return out

    out = anyio.run(main)
    assert mcp_ids(out["orders"][2]) == orders_of("2"), out["orders"]
    assert mcp_ids(out["customers"][2]) == customers_of("2"), out["customers"]
    widened = {
        k: (v[1][:200], mcp_ids(v[2]))
        for k, v in out.items()
        if k not in ("orders",) and not set(mcp_ids(v[2])) <= {2, 3, 6}
    }
    assert widened == {}
    assert mcp_ids(out["end"][2]) == [2]
    assert shop_rows(rls_shop) == shop_state


def test_mcp_http_hostile_arguments(env: Env, mcp_http: Mcp, shop_state: Any, rls_shop):
    token = env.token(["2"], task="atk-mcp-task")

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with anyio.fail_after(100):
            return await calls(out)

    async def calls(out: dict[str, Any]) -> dict[str, Any]:
        async with mcp_client(mcp_http, token) as client:
            for name, args in {
                "sql-int": {"sql": 42},
                "sql-list": {"sql": [CUSTOMERS_SQL]},
                "sql-null": {"sql": None},
                "sql-obj": {"sql": {"$ne": ""}},
                "params-obj": {"sql": CUSTOMERS_SQL, "params": {"a": 1}},
                "params-nested": {"sql": "SELECT $1::text", "params": [[1, 2]]},
                "params-many": {"sql": "SELECT $1::text", "params": ["1"] * 5000},
                "huge": {"sql": "SELECT 1 " + "-" * 300_000},
                "huge-in": {
                    "sql": "SELECT id FROM customers WHERE id IN ("
                    + ",".join(str(i) for i in range(60_000))
                    + ")"
                },
                "nul": {"sql": "SELECT id FROM customers\x00; SET guard.principals='1,2,3,4'"},
                "other-task": {"sql": CUSTOMERS_SQL, "task": "someone-elses"},
                "max-rows-neg": {"sql": CUSTOMERS_SQL, "max_rows": -1},
                "max-rows-huge": {"sql": CUSTOMERS_SQL, "max_rows": 10**12},
                "reason-inject": {
                    "sql": "DELETE FROM orders WHERE id = 1",
                    "reason": "x'); UPDATE orders SET fulfillment_status='returned'; --",
                },
                "idem-inject": {
                    "sql": "UPDATE orders SET fulfillment_status = 'returned' WHERE id = 1",
                    "idempotency_key": "k' OR '1'='1",
                },
                "step-inject": {
                    "sql": CUSTOMERS_SQL,
                    "step": "*/ SET guard.principals='1,2,3,4' /*",
                },
            }.items():
                try:
                    out[name] = await tool(client, "query", **args)
                except Exception as exc:  # a protocol-level refusal is fine too
                    out[name] = (True, repr(exc)[:200], None)
            out["task-other"] = await tool(client, "task", task="someone-elses")
            out["explain-setconfig"] = await tool(
                client, "explain", sql="SELECT set_config('guard.principals', '1,2,3,4', false)"
            )
            out["describe"] = await tool(client, "describe")
            out["end"] = await tool(client, "query", sql=CUSTOMERS_SQL)
        return out

    out = anyio.run(main)
    widened = {k: mcp_ids(v[2]) for k, v in out.items() if not set(mcp_ids(v[2])) <= {2, 3, 6}}
    assert widened == {}
    assert out["other-task"][0], out["other-task"][1][:300]
    assert mcp_ids(out["end"][2]) == [2]
    assert shop_rows(rls_shop) == shop_state
    assert token not in mcp_http.log() and token not in env.proxy.log()


def test_mcp_http_refuses_bad_bearers_and_bodies(env: Env, mcp_http: Mcp, shop_state: Any):
    bad = bad_tokens(env)
    good = env.token(["2"])
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "atk", "version": "1"},
        },
    }
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    passed = []
    with httpx2.Client(timeout=20) as http:
        for name, token in bad.items():
            if name in ("whitespace", "other-agent"):
                continue  # a valid token of support-8: the door lets support-8 in
            got = http.post(
                mcp_http.url, json=init, headers={**headers, "Authorization": f"Bearer {token}"}
            )
            if got.status_code < 400:
                passed.append((name, got.status_code))
            assert token not in got.text
        for body in (
            b"{not json",
            b"\xff\xfe",
            b"[]",
            b'{"jsonrpc": "2.0"}',
            b"null",
            b"1" * 2_000_000,
        ):
            got = http.post(
                mcp_http.url, content=body, headers={**headers, "Authorization": f"Bearer {good}"}
            )
            assert got.status_code >= 400 or "error" in got.text, (body[:30], got.status_code)
        assert (
            http.post(
                mcp_http.url, json=init, headers={**headers, "Authorization": "Bearer"}
            ).status_code
            == 401
        )
    assert passed == []
    assert mcp_http.proc.poll() is None


def test_mcp_http_many_concurrent_calls_stay_narrowed(
    env: Env, mcp_http: Mcp, shop_state: Any, rls_shop
):
    tokens = {p: env.token([p]) for p in ("1", "2", "3", "4")}

    async def one(principal: str, results: list[tuple[str, list[int], list[int]]]) -> None:
        async with mcp_client(mcp_http, tokens[principal]) as client:
            for _ in range(3):
                _, _, orders = await tool(client, "query", sql=ORDERS_SQL)
                _, _, customers = await tool(client, "query", sql=CUSTOMERS_SQL)
                results.append((principal, mcp_ids(orders), mcp_ids(customers)))

    async def main() -> list[tuple[str, list[int], list[int]]]:
        results: list[tuple[str, list[int], list[int]]] = []
        with anyio.fail_after(100):
            async with anyio.create_task_group() as group:
                for p in tokens:
                    for _ in range(3):
                        group.start_soon(one, p, results)
        return results

    results = anyio.run(main)
    assert results
    wrong = [
        r for r in results if not (set(r[1]) <= set(orders_of(r[0])) and set(r[2]) <= {int(r[0])})
    ]
    assert wrong == []
    assert any(r[1] for r in results)  # some calls ran (others may meet the concurrency cap)
    assert shop_rows(rls_shop) == shop_state


# ================================================================ MCP over stdio


def _stdio(
    env: Env,
    extra_env: dict[str, str],
    port: int | None = None,
    sqls: tuple[str, ...] = (
        CUSTOMERS_SQL,
        ORDERS_SQL,
        "SET \"GUARD.PRINCIPALS\" = '1,2,3,4'",
        CUSTOMERS_SQL,
    ),
) -> list[tuple[bool, str, Any]]:
    from mcp import StdioServerParameters
    from mcp.client.stdio import stdio_client

    params = StdioServerParameters(
        command=sys.executable,
        args=[
            "-m",
            "guardproxy",
            "mcp",
            "stdio",
            "--agent",
            AGENT,
            "--proxy",
            f"postgresql://127.0.0.1:{port or env.proxy.port}/{SHOP_DB}",
            "--policies",
            str(env.work / "policies"),
        ],
        env={**os.environ, **extra_env},
        cwd=str(ROOT),
    )

    async def main() -> list[tuple[bool, str, Any]]:
        out = []
        with anyio.fail_after(60):
            async with Client(stdio_client(params)) as client:
                for sql in sqls:
                    out.append(await tool(client, "query", sql=sql))
        return out

    return anyio.run(main)


def test_mcp_stdio_without_token_sees_nothing(env: Env, shop_state: Any):
    for extra in ({}, {"PGOPTIONS": "-c guard.principals=1,2,3,4"}):
        out = _stdio(env, extra)
        assert all(mcp_ids(r[2]) == [] for r in out), [(r[0], r[1][:100]) for r in out]


def test_mcp_stdio_with_token_in_pgoptions_stays_narrowed(env: Env, shop_state: Any):
    token = env.token(["4"])
    out = _stdio(env, {"PGOPTIONS": f"-c guard.token={token} -c guard.principals=1,2,3"})
    assert all(set(mcp_ids(r[2])) <= {4, 5} for r in out), [(r[0], r[1][:100]) for r in out]


# ================================================================ pooled servers


@pytest.fixture(scope="module")
def one_server(env: Env, rls_shop: PgCluster) -> Iterator[ShopProxy]:
    """A proxy whose support sessions share one server connection."""
    work = env.work / "one-server"
    work.mkdir(exist_ok=True)
    policies = policies_with(work, support={**POLICY, "limits": {"max_server_connections": 1}})
    with launch_proxy(
        rls_shop,
        work / "guardproxy.log",
        policies=policies,
        delegation_issuers=json.dumps(issuers(env.public)),
        delegation_revocations_refresh=1,
    ) as proxy:
        yield proxy


def extended(conn: Wire, sql: str, name: bytes = b"") -> Any:
    return conn.round(parse(name, sql), bind(b"", name), execute(), SYNC)


def test_a_shared_server_carries_no_other_sessions_principals(env: Env, one_server: ShopProxy):
    """Sessions A (token {1}) and B (token {3}) take turns on the one server: each
    statement, simple or extended, sees its own session's principals through RLS."""
    a = Wire(one_server.port, AGENT, options=f"-c guard.token={env.token(['1'])}")
    b = Wire(
        one_server.port,
        "support-8",
        options=f"-c guard.token={env.token(['3'], agent='support-8')}",
    )
    try:
        seen_a, seen_b = [], []
        for _ in range(3):
            seen_a.append(ids(a.q(CUSTOMERS_SQL)))
            seen_b.append(ids(b.q(CUSTOMERS_SQL)))
            seen_a.append(ids(extended(a, CUSTOMERS_SQL)))
            seen_b.append(ids(extended(b, CUSTOMERS_SQL)))
            seen_a.append(ids(extended(a, CUSTOMERS_SQL, b"named")))
            seen_b.append(ids(extended(b, CUSTOMERS_SQL, b"named")))
            a.round(close(b"S", b"named"), SYNC)
            b.round(close(b"S", b"named"), SYNC)
    finally:
        a.close()
        b.close()
    assert all(s == [1] for s in seen_a), seen_a
    assert all(s == [3] for s in seen_b), seen_b


@contextlib.contextmanager
def shared_proxy(env: Env, pg: PgCluster, name: str, **support: Any) -> Iterator[ShopProxy]:
    """A proxy whose support sessions share one server connection, the support policy
    changed by ``support``."""
    work = env.work / name
    work.mkdir(exist_ok=True)
    policies = policies_with(work, support={**support, "limits": {"max_server_connections": 1}})
    with launch_proxy(
        pg,
        work / "guardproxy.log",
        policies=policies,
        delegation_issuers=json.dumps(issuers(env.public)),
        delegation_revocations_refresh=1,
    ) as proxy:
        yield proxy


def test_a_real_clients_parameterised_reads_keep_their_own_principals(
    env: Env, one_server: ShopProxy
):
    opts_a = f"-c guard.token={env.token(['1'])}"
    opts_b = f"-c guard.token={env.token(['3'], agent='support-8')}"
    got_a: list[list[int]] = []
    with (
        psycopg.connect(one_server.dsn(AGENT) + "", autocommit=True, options=opts_a) as a,
        psycopg.connect(one_server.dsn("support-8"), autocommit=True, options=opts_b) as b,
    ):
        for _ in range(3):
            b.execute("SELECT id FROM customers ORDER BY id").fetchall()
            rows = a.execute("SELECT id FROM customers WHERE id > %s ORDER BY id", (0,))
            got_a.append([r[0] for r in rows])
    assert all(r == [1] for r in got_a), got_a


def test_an_optional_session_without_token_gets_no_principals(env: Env, rls_shop: PgCluster):
    with shared_proxy(env, rls_shop, "optional", delegation="optional") as proxy:
        b = Wire(
            proxy.port, "support-8", options=f"-c guard.token={env.token(['3'], agent='support-8')}"
        )
        a = Wire(proxy.port, AGENT)  # no token
        try:
            declared = [ids(a.q("SET guard.principals = '1,2,3,4'")), ids(a.q(CUSTOMERS_SQL))]
            leaked = []
            for _ in range(3):
                assert ids(b.q(CUSTOMERS_SQL)) == [3]
                leaked.append(ids(extended(a, CUSTOMERS_SQL)))
        finally:
            a.close()
            b.close()
    assert declared == [[], []], declared  # declared principals never reach Postgres
    assert all(r == [] for r in leaked), leaked


def test_rls_only_writes_stay_with_the_tokens_principals_on_a_shared_server(
    env: Env, rls_shop: PgCluster
):
    rls_shop.psql(
        rls_policy_sql(
            "orders",
            "customer_id",
            ["guard_support"],
            column_type="bigint",
            other_roles=["guard_analytics", "guard_fulfillment"],
        ),
        dbname=SHOP_DB,
    )
    before = su(rls_shop, "SELECT id, fulfillment_status FROM orders ORDER BY id")
    try:
        with shared_proxy(env, rls_shop, "rls-only", delegation="required") as proxy:
            a = Wire(proxy.port, AGENT, options=f"-c guard.token={env.token(['1'])}")
            b = Wire(
                proxy.port,
                "support-8",
                options=f"-c guard.token={env.token(['3'], agent='support-8')}",
            )
            try:
                assert ids(a.q(ORDERS_SQL)) == orders_of("1")
                assert ids(b.q(ORDERS_SQL)) == orders_of("3")
                got = a.round(
                    parse(b"", "UPDATE orders SET fulfillment_status = 'returned' WHERE id = $1"),
                    bind(b"", b"", b"4"),
                    execute(),
                    SYNC,
                )
            finally:
                a.close()
                b.close()
        after = su(rls_shop, "SELECT id, fulfillment_status FROM orders ORDER BY id")
        assert after == before, (summary(got), after)
    finally:
        rls_shop.psql(
            "DROP POLICY IF EXISTS guard_principals ON orders; "
            "DROP POLICY IF EXISTS guard_no_delegation ON orders; "
            "ALTER TABLE orders DISABLE ROW LEVEL SECURITY",
            dbname=SHOP_DB,
        )
        su(rls_shop, "UPDATE orders SET fulfillment_status = 'pending' WHERE id = 4")
        su(
            rls_shop,
            "DELETE FROM order_state_log WHERE idempotency_key IS NULL "
            "OR idempotency_key NOT LIKE 'seed-%'",
        )


# ================================================================ tokens as passwords (SCRAM)

FAKE_TOKEN = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9."  # shaped like a JWS, signed by nobody


@pytest.fixture(scope="module")
def scram_proxy(env: Env, rls_shop: PgCluster) -> Iterator[ShopProxy]:
    """SCRAM logins: support-1 has a password; support-7 and support-8 log in with their
    tokens; ``admin`` is an admin user whose password the operator has not set (or
    removed to lock the account)."""
    from guardproxy.protocol.scram import write_verifier

    work = env.work / "scram"
    work.mkdir(exist_ok=True)
    auth = work / "agents.auth"
    write_verifier(auth, "support-1", "support-pw")
    write_verifier(auth, "root", "root-pw")
    with launch_proxy(
        rls_shop,
        work / "guardproxy.log",
        policies=env.work / "policies",
        auth_mode="scram",
        auth_file=auth,
        admin_users="admin,root",
        delegation_issuers=json.dumps(issuers(env.public)),
        delegation_revocations_refresh=1,
        auth_max_failures=1000,
    ) as proxy:
        yield proxy


def _login(proxy: ShopProxy, user: str, password: str, db: str = SHOP_DB, **kw: Any) -> Any:
    return psycopg.connect(
        host="127.0.0.1",
        port=proxy.port,
        user=user,
        dbname=db,
        password=password,
        autocommit=True,
        connect_timeout=int(WAIT),
        **kw,
    )


def test_tokens_as_passwords_are_verified(env: Env, scram_proxy: ShopProxy, shop_state: Any):
    good = env.token(["3"])
    with _login(scram_proxy, AGENT, good) as conn:
        assert [r[0] for r in conn.execute(CUSTOMERS_SQL)] == [3]
    logged_in = []
    for name, token in bad_tokens(env).items():
        if name == "whitespace":
            continue
        try:
            with _login(scram_proxy, AGENT, token) as conn:
                logged_in.append((name, [r[0] for r in conn.execute(CUSTOMERS_SQL)]))
        except psycopg.Error:
            pass
    for user, password in (
        ("support-8", good),  # support-7's token, another agent
        ("support-1", good),  # an agent with a password of its own
        ("support-9", FAKE_TOKEN),
        ("support-9", "not-a-token"),
    ):
        try:
            with _login(scram_proxy, user, password) as conn:
                logged_in.append((user, [r[0] for r in conn.execute(CUSTOMERS_SQL)]))
        except psycopg.Error:
            pass
    # the password's token and a wider one in the options: never the wider one
    wide = env.token(["1", "2", "3", "4"])
    try:
        with _login(scram_proxy, AGENT, good, options=f"-c guard.token={wide}") as conn:
            both = [r[0] for r in conn.execute(CUSTOMERS_SQL)]
    except psycopg.Error:
        both = []
    assert logged_in == []
    assert set(both) <= {3} or set(both) == {1, 2, 3, 4}, both


def test_the_admin_console_does_not_take_an_unverified_token(
    env: Env, scram_proxy: ShopProxy, rls_shop: PgCluster
):
    def revocations() -> list[tuple[Any, ...]]:
        return su(rls_shop, "SELECT * FROM guardproxy.token_revocations ORDER BY 1")

    env.admin(f"REVOKE TOKENS FOR PRINCIPAL 'atk-admin' ISSUER '{ISSUER}'")
    before = revocations()
    entered = []
    try:
        for password in (FAKE_TOKEN, bad_tokens(env)["alg-none"], env.token(["1"])):
            try:
                with _login(scram_proxy, "admin", password, db="guardproxy") as conn:
                    with contextlib.suppress(psycopg.Error):
                        conn.execute(f"UNREVOKE TOKENS FOR PRINCIPAL 'atk-admin' ISSUER '{ISSUER}'")
                    entered.append(password[:20])
            except psycopg.OperationalError:
                pass
        after = revocations()
    finally:
        env.admin(f"UNREVOKE TOKENS FOR PRINCIPAL 'atk-admin' ISSUER '{ISSUER}'")
    assert after == before, "an unauthenticated client changed the revocation list"
    assert entered == []


# ================================================================ around the row filter

ROW_FILTER_READS = [
    "TABLE orders",
    "SELECT id FROM ONLY orders",
    "SELECT id FROM public.orders",
    'SELECT id FROM "orders"',
    'SELECT id FROM public."orders" AS "o"',
    "SELECT o.id FROM orders o",
    "SELECT id FROM (SELECT * FROM orders) s",
    "WITH o AS (SELECT * FROM orders) SELECT id FROM o",
    "WITH RECURSIVE o AS (SELECT * FROM orders) SELECT id FROM o",
    "SELECT id FROM orders UNION ALL SELECT id FROM orders",
    "SELECT unnest((SELECT array_agg(id) FROM orders))",
    "SELECT o.id FROM customers c JOIN orders o ON o.customer_id = c.id OR true",
    "SELECT id FROM orders WHERE customer_id = 1 OR customer_id = 2",
    "SELECT id FROM orders, LATERAL (SELECT 1) x",
    "SELECT (o).id FROM orders o",
    "SELECT id FROM orders TABLESAMPLE SYSTEM (100)",
    "SELECT id FROM orders WHERE id IN (SELECT id FROM orders)",
    "SELECT id FROM orders o1 WHERE EXISTS (SELECT 1 FROM orders o2 WHERE o2.id = o1.id)",
    "COPY orders TO STDOUT",
    "COPY (SELECT id FROM orders) TO STDOUT",
    "SELECT query_to_xml('SELECT id FROM orders', true, false, '')",
    "SELECT table_to_xml('orders', true, false, '')",
    "SELECT query_to_json('SELECT id FROM orders')",
    "SELECT xpath('//id/text()', query_to_xml('SELECT id FROM orders', true, false, ''))",
    "SELECT schema_to_xml('public', true, false, '')",
    "SELECT database_to_xml(true, false, '')",
    "DECLARE c CURSOR FOR SELECT id FROM orders",
    "EXPLAIN ANALYZE SELECT id FROM orders",
    "PREPARE p AS SELECT id FROM orders",
]


def _others_orders_in(text: str) -> list[int]:
    """Order ids of customers other than 3 that appear in ``text`` as values."""
    import re

    found = set()
    for pattern in (r"<id>(\d+)</id>", r"(?m)^(\d+)\t", r"\"id\"\s*:\s*(\d+)"):
        found |= {int(x) for x in re.findall(pattern, text)}
    return sorted(found - {4})


@pytest.mark.parametrize("attack", ROW_FILTER_READS)
def test_reads_around_the_row_filter_see_only_the_tokens_orders(
    env: Env, shop_state: Any, attack: str
):
    conn = env.wire(env.token(["3"]))
    try:
        conn.q("BEGIN")
        got = conn.q(attack)
        follow = []
        if attack.startswith("DECLARE"):
            follow = conn.q("FETCH ALL FROM c")
        elif attack.startswith("PREPARE"):
            follow = conn.q("EXECUTE p")
        conn.q("ROLLBACK")
    finally:
        conn.close()
    values = [str(v) for row in rows_of(got) + rows_of(follow) for v in row]
    copy = b"".join(raw[5:] for kind, raw in got if kind == b"d").decode(errors="replace")
    numbers = [int(r[0]) for r in rows_of(got) + rows_of(follow) if r and (r[0] or "").isdigit()]
    if "EXPLAIN" not in attack:
        assert set(numbers) <= {4}, (attack, values[:20])
    assert _others_orders_in("\n".join(values) + "\n" + copy) == [], (attack, values[:5], copy)


def rows_of(msgs: Any) -> list[list[str | None]]:
    from test_attack_relay import rows

    return rows(msgs) if msgs else []


# ================================================================ revocation details


@pytest.mark.parametrize(
    ("principals", "revoked"),
    [(["1", "2"], "2"), ([2, 1], "2"), (["2"], "2"), ([" 2"], " 2")],
    ids=["one-of-two", "integers", "string", "spaced"],
)
def test_revoking_a_principal_stops_every_token_naming_it(
    env: Env, shop_state: Any, principals: list[Any], revoked: str
):
    conn = env.wire(env.token(principals))
    try:
        assert seen(conn, CUSTOMERS_SQL)
        time.sleep(1.1)  # the revocation covers tokens issued before it (seconds)
        env.admin(f"REVOKE TOKENS FOR PRINCIPAL '{revoked}' ISSUER '{ISSUER}'")
        try:
            deadline = time.monotonic() + 15
            got = conn.q(CUSTOMERS_SQL)
            while ids(got) and time.monotonic() < deadline:
                time.sleep(0.2)
                got = conn.q(CUSTOMERS_SQL)
            assert ids(got) == [], summary(got)
            assert "revoked" in " ".join(messages(got))
            # a prepared statement of the revoked token, bound afterwards
            assert ids(conn.round(parse(b"", ORDERS_SQL), bind(b"", b""), execute(), SYNC)) == []
        finally:
            env.admin(f"UNREVOKE TOKENS FOR PRINCIPAL '{revoked}' ISSUER '{ISSUER}'")
    finally:
        conn.close()


@pytest.mark.parametrize("agent", ["support-*", "support-?", "support-[0-9]", "*", "support-7 "])
def test_a_glob_shaped_agent_id_cannot_use_another_agents_token(
    env: Env, shop_state: Any, agent: str
):
    token = env.token(["1", "2", "3", "4"])  # support-7's
    try:
        conn = env.wire(token, agent=agent)
    except (ConnectionError, TimeoutError):
        return
    try:
        got = [seen(conn, CUSTOMERS_SQL), seen(conn, ORDERS_SQL)]
        conn.q(f"SET guard.token = '{token}'")
        got += [seen(conn, CUSTOMERS_SQL), seen(conn, ORDERS_SQL)]
    finally:
        conn.close()
    assert got == [[], [], [], []], (agent, got)


# ================================================================ MCP sessions, explain, writes

_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def _rpc(method: str, params: dict[str, Any], ident: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": ident, "method": method, "params": params}


def _rpc_rows(text: str) -> list[int]:
    """The ids of a tools/call answer (JSON or an SSE stream)."""
    out: list[int] = []
    for line in text.splitlines():
        line = line.removeprefix("data: ").strip()
        if not line.startswith("{"):
            continue
        with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
            data = json.loads(line)["result"]["structuredContent"]
            out += mcp_ids(data)
    return out


def test_an_mcp_session_is_bound_to_the_token_that_opened_it(
    env: Env, mcp_http: Mcp, shop_state: Any
):
    opener = env.token(["2"])
    init = _rpc(
        "initialize",
        {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "atk", "version": "1"},
        },
    )
    call = _rpc("tools/call", {"name": "query", "arguments": {"sql": CUSTOMERS_SQL}}, 2)
    with httpx2.Client(timeout=20) as http:
        opened = http.post(
            mcp_http.url, json=init, headers={**_HEADERS, "Authorization": f"Bearer {opener}"}
        )
        session = opened.headers.get("mcp-session-id")
        if session is None:
            pytest.skip("the server runs without MCP sessions")
        base = {**_HEADERS, "Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-06-18"}
        http.post(
            mcp_http.url,
            json={"jsonrpc": "2.0", "method": "notifications/initialized"},
            headers={**base, "Authorization": f"Bearer {opener}"},
        )
        own = http.post(
            mcp_http.url, json=call, headers={**base, "Authorization": f"Bearer {opener}"}
        )
        answers = {}
        for name, token in {
            "same-agent-wider": env.token(["1", "2", "3", "4"]),
            "other-agent": env.token(["1", "2", "3", "4"], agent="support-8"),
            "forged": bad_tokens(env)["header-jwk"],
        }.items():
            got = http.post(
                mcp_http.url, json=call, headers={**base, "Authorization": f"Bearer {token}"}
            )
            answers[name] = (got.status_code, _rpc_rows(got.text))
    assert _rpc_rows(own.text) == [2], own.text[:300]
    assert all(code in (401, 403, 404) and not rows for code, rows in answers.values()), answers


def test_mcp_explain_never_runs_and_writes_stay_narrowed(
    env: Env, mcp_http: Mcp, shop_state: Any, rls_shop: PgCluster
):
    token = env.token(["2"])
    writes = [
        "UPDATE orders SET fulfillment_status = 'returned' WHERE id = 4",
        "UPDATE orders SET fulfillment_status = 'returned' WHERE id > 0",
        "DELETE FROM orders WHERE id IN (1, 4, 5)",
        "WITH x AS (UPDATE orders SET fulfillment_status = 'returned' WHERE id = 1 RETURNING id) "
        "SELECT id FROM x",
    ]

    async def main() -> list[tuple[bool, str, Any]]:
        out = []
        with anyio.fail_after(60):
            async with mcp_client(mcp_http, token) as client:
                for sql in writes:
                    out.append(await tool(client, "explain", sql=sql))
                    out.append(await tool(client, "explain", sql="ANALYZE " + sql))
                    out.append(await tool(client, "explain", sql=f"SELECT 1; {sql}"))
                for sql in writes:
                    out.append(await tool(client, "query", sql=sql, task=None))
        return out

    anyio.run(main)
    changed = su(
        rls_shop,
        "SELECT id FROM orders WHERE fulfillment_status = 'returned' OR deleted_at IS NOT NULL",
    )
    try:
        assert {r[0] for r in changed} <= {3, 6}, changed
    finally:
        su(
            rls_shop,
            "UPDATE orders SET fulfillment_status = CASE id WHEN 1 THEN 'delivered' WHEN 2 THEN "
            "'shipped' WHEN 3 THEN 'packed' WHEN 6 THEN 'cancelled' ELSE 'pending' END, "
            "deleted_at = NULL, deleted_by = NULL, delete_reason = NULL",
        )
        su(
            rls_shop,
            "DELETE FROM order_state_log WHERE idempotency_key IS NULL "
            "OR idempotency_key NOT LIKE 'seed-%'",
        )


def test_an_mcp_agent_without_token_inherits_no_principals(env: Env, rls_shop: PgCluster):
    with shared_proxy(env, rls_shop, "mcp-optional", delegation="optional") as proxy:
        b = Wire(
            proxy.port,
            "support-8",
            options=f"-c guard.token={env.token(['3'], agent='support-8')}",
        )
        try:
            assert ids(b.q(CUSTOMERS_SQL)) == [3]
            out = _stdio(env, {}, port=proxy.port, sqls=(CUSTOMERS_SQL,))
        finally:
            b.close()
    assert [mcp_ids(r[2]) for r in out] == [[]], [(r[0], r[1][:200]) for r in out]


@pytest.mark.parametrize(
    "suffix",
    [
        " -c guard.principals=1,2,3,4",
        "\t-c guard.principals=1,2,3,4",
        " --guard.principals=1,2,3,4",
        "\\ -c\\ guard.principals=1,2,3,4",
        ",eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.",
    ],
    ids=["space", "tab", "dashdash", "escaped", "comma"],
)
def test_an_mcp_bearer_cannot_carry_extra_options(
    env: Env, mcp_http: Mcp, shop_state: Any, suffix: str
):
    token = env.token(["2"])

    async def main() -> Any:
        with anyio.fail_after(30):
            async with mcp_client(mcp_http, token + suffix) as client:
                return await tool(client, "query", sql=CUSTOMERS_SQL)

    try:
        result = anyio.run(main)
    except BaseException:  # refused at the door: nothing ran
        return
    assert set(mcp_ids(result[2])) <= {2}, result[1][:300]


def test_a_proxy_without_policies_does_not_take_an_unverified_token(env: Env, rls_shop: PgCluster):
    from guardproxy.protocol.scram import write_verifier

    work = env.work / "no-policies"
    work.mkdir(exist_ok=True)
    auth = work / "agents.auth"
    write_verifier(auth, "app-1", "app-pw")
    with launch_proxy(
        rls_shop,
        work / "guardproxy.log",
        policies=None,
        auth_mode="scram",
        auth_file=auth,
        delegation_issuers=json.dumps(issuers(env.public)),
        auth_max_failures=1000,
    ) as proxy:
        entered = []
        for password in (FAKE_TOKEN, bad_tokens(env)["alg-none"]):
            try:
                with _login(proxy, "intruder", password) as conn:
                    entered.append(conn.execute("SELECT count(*) FROM customers").fetchone())
            except psycopg.Error:
                pass
    assert entered == []


@pytest.mark.parametrize(
    "drop",
    [
        "RESET guard.token",
        "SET guard.token = ''",
        "SET guard.token TO DEFAULT",
        "RESET ALL",
        "DISCARD ALL",
    ],
)
def test_a_session_logged_in_by_a_revoked_token_cannot_shed_it(
    env: Env, rls_shop: PgCluster, drop: str
):
    """delegation: optional; support-7 has no password and logs in with its token. Once
    the token is revoked, dropping it does not leave a session that declares principals."""
    from guardproxy.protocol.scram import write_verifier

    work = env.work / f"optional-scram-{abs(hash(drop))}"
    work.mkdir(exist_ok=True)
    auth = work / "agents.auth"
    write_verifier(auth, "support-1", "support-pw")
    policies = policies_with(work, support={**POLICY, "delegation": "optional"})
    jti = f"atk-shed-{time.time_ns()}"
    with (
        launch_proxy(
            rls_shop,
            work / "guardproxy.log",
            policies=policies,
            auth_mode="scram",
            auth_file=auth,
            admin_users="support-1",
            delegation_issuers=json.dumps(issuers(env.public)),
            delegation_revocations_refresh=1,
        ) as proxy,
        _login(proxy, AGENT, env.token(["1"], token_id=jti)) as conn,
    ):
        assert [r[0] for r in conn.execute(ORDERS_SQL)] == orders_of("1")
        env.admin(f"REVOKE TOKEN '{jti}' REASON 'attack test'")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                conn.execute("SELECT 1")
            except psycopg.Error:
                break
            time.sleep(0.2)
        got: list[Any] = []
        for sql in (drop, "SET guard.principals = '1,2,3,4'", ORDERS_SQL):
            try:
                cur = conn.execute(sql)
                if cur.description:
                    got += [r[0] for r in cur.fetchall()]
            except psycopg.Error:
                pass
    assert got == [], (drop, got)
