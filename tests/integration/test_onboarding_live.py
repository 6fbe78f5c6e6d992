"""The audit CLI and replay against the real shop database and proxy: undo by agent and
period, text an agent wrote shown as data (a ``[/]`` and escape sequences in a delete
reason), no embedded cluster started behind the operator's back, and replay of what
``pg_stat_statements`` recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import shop
from pgcluster import PgCluster
from psycopg import sql
from shop import SHOP_DB, ShopProxy, launch_proxy

from guardproxy import embedded

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline
clean_shop = shop.clean_shop

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).resolve().parents[2]
HOSTILE = "spam [/] [bold red]x\x1b[2J\x1b]0;pwned\x07\u202eevil"


def gp(*args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARDPROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "guardproxy", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(env, COLUMNS=str(columns)),
        timeout=60,
        check=False,
    )


@pytest.fixture
def proxy(clean_shop: PgCluster, tmp_path: Path) -> Iterator[ShopProxy]:
    with launch_proxy(clean_shop, tmp_path / "guardproxy.log") as handle:
        yield handle


def test_audit_and_undo_never_start_the_embedded_cluster() -> None:
    pid_file = embedded.default_home() / "data" / "postmaster.pid"
    running_before = pid_file.exists()
    for args in (("audit", "deletes"), ("audit", "writes"), ("undo", "--task", "T-1", "--yes")):
        out = gp(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "give --upstream DSN or set GUARDPROXY_UPSTREAM" in out.stderr
        assert "Traceback" not in out.stderr
    assert pid_file.exists() == running_before


def test_undo_by_agent_and_period_restores_its_deletes_and_records_the_undo(
    proxy: ShopProxy, clean_shop: PgCluster
) -> None:
    dsn = clean_shop.dsn(dbname=SHOP_DB)
    with proxy.connect("support-42", autocommit=True) as conn:
        assert conn.execute("DELETE FROM orders WHERE id IN (4, 5)").statusmessage == "DELETE 2"
    with proxy.connect("support-43", autocommit=True) as conn:
        assert conn.execute("DELETE FROM orders WHERE id = 6").statusmessage == "DELETE 1"
    dry = gp("undo", "--agent", "support-42", "--since", "2h", "--dry-run", "--upstream", dsn)
    assert dry.returncode == 0, dry.stderr
    assert "dry run: 2 rows of agent support-42 in the last 2h would be restored" in dry.stdout
    both = gp("undo", "--agent", "support-42", "--row", "orders:4", "--upstream", dsn)
    assert both.returncode == 2 and "exactly one of" in both.stderr
    done = gp("undo", "--agent", "support-42", "--since", "2h", "--yes", "--upstream", dsn)
    assert done.returncode == 0 and "restored 2 rows" in done.stdout, done.stderr
    deleted = clean_shop.psql(
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM orders WHERE deleted_at IS NOT NULL",
        dbname=SHOP_DB,
    )
    assert deleted == "6"  # the other agent's delete stays
    recorded = clean_shop.psql(
        "SELECT reason FROM guardproxy.audit_events WHERE decision = 'undo' ORDER BY id DESC LIMIT 1",
        dbname=SHOP_DB,
    )
    assert recorded == "guardproxy undo --agent support-42 --since 2h"
    row = gp("undo", "--row", "public.orders:id=6", "--yes", "--upstream", dsn)
    assert row.returncode == 0 and "restored 1 rows" in row.stdout, row.stderr
    again = gp("undo", "--row", "orders:6", "--yes", "--upstream", dsn)
    assert again.returncode == 0 and "no deleted rows left to restore" in again.stdout


def test_text_an_agent_wrote_is_shown_as_data(proxy: ShopProxy, clean_shop: PgCluster) -> None:
    dsn = clean_shop.dsn(dbname=SHOP_DB)
    with proxy.connect("support-44", autocommit=True) as conn:
        # the proxy refuses context values that are not printable text at the door ...
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute(sql.SQL("SET guard.reason = {}").format(sql.Literal(HOSTILE)))
        conn.execute("SET guard.reason = 'spam [/] [bold red]x'")
        conn.execute("SET guard.task = 't-44'")
        conn.execute("DELETE FROM orders WHERE id = 5")
    # ... and the CLI shows whatever the record holds as data, whoever wrote it there
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE guardproxy.deleted_rows SET reason = %s, task = %s "
            "WHERE agent_id = 'support-44'",
            (HOSTILE, "t\x1b[31m"),
        )
        conn.execute(
            "UPDATE guardproxy.audit_events SET task = %s WHERE agent_id = 'support-44'",
            ("t\x1b[31m",),
        )
        stored = conn.execute(
            "SELECT reason FROM guardproxy.deleted_rows WHERE agent_id = 'support-44'"
        ).fetchone()
    assert stored == (HOSTILE,)
    for columns in (80, 160):
        for args in (("audit", "deletes"), ("audit", "writes"), ("audit", "task", "t\x1b[31m")):
            out = gp(
                *args,
                "--agent" if args[1] != "task" else "--since",
                "support-44" if args[1] != "task" else "1h",
                "--upstream",
                dsn,
                columns=columns,
            )
            assert out.returncode == 0, (args, out.stderr)
            assert (
                "\x1b" not in out.stdout and "\u202e" not in out.stdout and "\x07" not in out.stdout
            )
            assert all(len(line) <= columns for line in out.stdout.splitlines()), out.stdout
        listed = gp("audit", "deletes", "--agent", "support-44", "--upstream", dsn, columns=columns)
        assert "[/]" in listed.stdout and "\\x1b[2J" in listed.stdout
    plan = gp("undo", "--agent", "support-44", "--dry-run", "--upstream", dsn)
    assert plan.returncode == 0 and "\x1b" not in plan.stdout
    as_json = json.loads(
        gp("audit", "deletes", "--agent", "support-44", "--json", "--upstream", dsn).stdout
    )
    assert as_json[0]["reason"] == HOSTILE  # JSON escapes, and keeps the exact text


def test_replay_reads_pg_stat_statements(pg: PgCluster) -> None:
    pg.psql("DROP DATABASE IF EXISTS replay_pss WITH (FORCE)", dbname="postgres")
    pg.psql("CREATE DATABASE replay_pss OWNER app_owner", dbname="postgres")
    try:
        superuser = pg.dsn("postgres", "replay_pss")
        with psycopg.connect(superuser, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        with psycopg.connect(pg.dsn(dbname="replay_pss"), autocommit=True) as conn:
            conn.execute("CREATE TABLE customers (id bigint PRIMARY KEY, name text, email text)")
            for _ in range(3):
                conn.execute("SELECT id, name FROM customers WHERE id = 424242")
            conn.execute("SELECT email FROM customers WHERE id = 424243")
        out = gp(
            "replay", "--agent-type", "analytics", "--from", "pg_stat_statements",
            "--user", "app_owner", "--upstream", superuser, "--json", "--examples", "9",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)
        examples = {
            e["sql"]: (r["outcome"], r["rule"], r["count"])
            for r in summary["rules"]
            for e in r["examples"]
        }
        normalized = "SELECT id, name FROM customers WHERE id = $1"
        assert examples[normalized][0] == "rewritten" and examples[normalized][2] >= 3  # calls
        denied = examples["SELECT email FROM customers WHERE id = $1"]
        assert denied[:2] == ("denied", "tables.customers.deny_columns")
    finally:
        pg.psql("DROP DATABASE IF EXISTS replay_pss WITH (FORCE)", dbname="postgres")
    missing = gp("replay", "--agent-type", "analytics", "--from", "pg_stat_statements")
    assert missing.returncode == 2 and "--upstream" in missing.stderr
