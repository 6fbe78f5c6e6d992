"""The shortest proof that the proxy relays a session to the real Postgres."""

from __future__ import annotations

import os

import psycopg


def test_select_through_proxy_runs_on_upstream_as_configured_role(proxy) -> None:
    with psycopg.connect(proxy.dsn("agent-7"), autocommit=True) as conn:
        row = conn.execute("select current_user, current_database(), 40 + 2").fetchone()
    assert row == ("app_owner", "app", 42)


def test_the_proxy_says_how_it_runs_its_hot_path(proxy) -> None:
    # scripts/check runs the suite a second time with GUARDPROXY_NATIVE set: then every
    # proxy these tests start must run the compiled modules, not the sources
    expected = "compiled (mypyc)" if os.environ.get("GUARDPROXY_NATIVE") else "pure Python"
    with psycopg.connect(proxy.dsn("agent-7"), autocommit=True) as conn:
        conn.execute("select 1")
    assert f"hot path {expected}" in proxy.log()
