"""The shortest proof that the proxy relays a session to the real Postgres."""

from __future__ import annotations

import psycopg


def test_select_through_proxy_runs_on_upstream_as_configured_role(proxy) -> None:
    with psycopg.connect(proxy.dsn("agent-7"), autocommit=True) as conn:
        row = conn.execute("select current_user, current_database(), 40 + 2").fetchone()
    assert row == ("app_owner", "app", 42)
