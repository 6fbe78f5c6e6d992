"""The admin console answers psql with ordinary result sets, and its actions take effect."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import unicodedata

import psycopg
import pytest
from conftest import wait_until
from pgcluster import PG_BINDIR
from wirekit import WireClient

from guardproxy.safetext import UNSAFE_CATEGORIES


def admin(proxy, sql: str, user: str = "ops") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            f"{PG_BINDIR}/psql",
            "-X",
            "-A",
            "-F",
            "|",
            "-d",
            proxy.dsn(user, dbname="guardproxy"),
            "-c",
            sql,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def console(start_proxy):
    return start_proxy(admin_users="ops")


def test_show_views_answer_psql_with_rows(console) -> None:
    with psycopg.connect(console.dsn("support-1"), autocommit=True) as conn:
        conn.execute("select 1").fetchone()
        clients = admin(console, "SHOW CLIENTS")
        assert clients.returncode == 0, clients.stderr
        assert "agent|agent_type|peer|state" in clients.stdout
        assert "support-1|" in clients.stdout
    pools = admin(console, "SHOW POOLS")
    assert pools.returncode == 0 and pools.stdout.splitlines()[1].startswith("default|app_owner@")
    for view in ("SERVERS", "AGENTS", "STATS", "CONFIG"):
        out = admin(console, f"SHOW {view}")
        assert out.returncode == 0, (view, out.stderr)
        assert "(" in out.stdout.splitlines()[-1] and "row" in out.stdout.splitlines()[-1]
    config = admin(console, "SHOW CONFIG").stdout
    assert "pool_size|5" in config and "app_pw" not in config  # the upstream password is masked


def test_non_admin_is_refused_and_unknown_command_explains(console) -> None:
    refused = admin(console, "SHOW POOLS", user="analytics-1")
    assert refused.returncode != 0 and "may not use the admin console" in refused.stderr
    unknown = admin(console, "DROP TABLE x")
    assert (
        unknown.returncode != 0
        and "unknown admin command" in unknown.stderr
        and "SHOW POOLS" in unknown.stderr
    )


def test_kill_agent_rolls_back_its_open_transaction(console, pg) -> None:
    pg.psql("create table if not exists admin_kill(x int); truncate admin_kill", user="app_owner")
    conn = psycopg.connect(console.dsn("agent-x"))
    conn.execute("insert into admin_kill values (1)")  # open transaction, not committed
    killed = admin(console, "KILL AGENT agent-x")
    assert killed.returncode == 0 and "agent-x|1" in killed.stdout
    with pytest.raises(psycopg.OperationalError):
        conn.execute("commit")
    conn.close()
    assert pg.psql("select count(*) from admin_kill", user="app_owner") == "0"
    pg.psql("drop table admin_kill", user="app_owner")


def test_pause_holds_new_transactions_until_resume(console) -> None:
    assert admin(console, "PAUSE").returncode == 0
    done: list[int] = []

    def client() -> None:
        with psycopg.connect(console.dsn("agent-p"), autocommit=True) as conn:
            done.append(conn.execute("select 7").fetchone()[0])

    t = threading.Thread(target=client)
    t.start()
    try:
        t.join(1.0)
        assert done == []  # held while paused
    finally:
        assert admin(console, "RESUME").returncode == 0
    t.join(10)
    wait_until(lambda: done == [7], what="the held query to run after RESUME")


def test_top_shows_agent_db_time_including_a_slow_statement(console) -> None:
    with psycopg.connect(console.dsn("slow-agent"), autocommit=True) as conn:
        conn.execute("select pg_sleep(0.3)").fetchone()
    with psycopg.connect(console.dsn("fast-agent"), autocommit=True) as conn:
        conn.execute("select 1").fetchone()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "guardproxy",
            "top",
            "--dsn",
            console.dsn("ops", dbname="guardproxy"),
            "--interval",
            "0.2",
            "--iterations",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stderr
    # trust mode: agents of one type share the label "*", so one row carries both
    assert "guardproxy top" in out.stdout and "DB time" in out.stdout
    assert "*" in out.stdout and "default" in out.stdout
    total = re.search(r"(\d+\.\d+)s \(100%\)", out.stdout)
    assert total is not None and float(total.group(1)) >= 0.3  # the pg_sleep(0.3) is in it


# ---------------------------------------------------------------- agent text and secrets

HOSTILE_AGENT = "evil\x1b[2J\x1b]0;owned\x07\nforged|row\u202e"


async def test_show_clients_shows_a_hostile_agent_id_as_visible_escapes(console) -> None:
    """In trust mode the agent id is any user name: it reaches the operator as data."""
    async with await WireClient.connect(console.port) as raw:
        await raw.login(user=HOSTILE_AGENT)

        def show_clients() -> list[tuple[str, ...]]:
            dsn = console.dsn("ops", dbname="guardproxy")
            with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
                return conn.execute("SHOW CLIENTS").fetchall()

        rows = await asyncio.to_thread(show_clients)
        shown = [r[0] for r in rows]
        assert "evil\\x1b[2J\\x1b]0;owned\\x07\\x0aforged|row\\u202e" in shown, shown
        for value in (v for r in rows for v in r):
            assert not any(unicodedata.category(c) in UNSAFE_CATEGORIES for c in value or "")
        psql = await asyncio.to_thread(admin, console, "SHOW CLIENTS")
        assert psql.returncode == 0 and "\x1b" not in psql.stdout
        assert not any(line.startswith("row") for line in psql.stdout.splitlines())


def test_show_config_masks_every_credential_form_of_the_upstream(start_proxy, pg) -> None:
    """A password with an unencoded '@' and ':' (the old mask stopped at the '@'), and
    query parameters carrying secrets: none of it is shown, and the proxy works with it."""
    password = "p@ss:w/rd?x"
    pg.psql(
        "DROP ROLE IF EXISTS mask_user; "
        f"CREATE ROLE mask_user LOGIN PASSWORD '{password}'; "
        "GRANT CONNECT ON DATABASE app TO mask_user",
        dbname="postgres",
    )
    encoded = "p@ss:w%2Frd%3Fx"  # '/' and '?' must be encoded to reach the user info at all
    upstream = (
        f"postgresql://mask_user:{encoded}@{pg.host}:{pg.port}/app"
        "?sslpassword=keysecret&application_name=masked"
    )
    console = start_proxy(upstream=upstream, admin_users="ops")
    with psycopg.connect(console.dsn("agent-m"), autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("mask_user",)
    out = admin(console, "SHOW CONFIG")
    assert out.returncode == 0, out.stderr
    assert (
        f"upstream|postgresql://mask_user:***@{pg.host}:{pg.port}/app"
        "?sslpassword=***&application_name=masked"
    ) in out.stdout
    for secret in (password, encoded, "ss:w", "keysecret", "rd%3Fx"):
        assert secret not in out.stdout
