"""Issue 4's behaviours through the real proxy: soft deletes that leave every row in the
table and can be listed and undone, row caps on writes and reads, and the tags and
monitoring views that show who ran what."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import shop
from pgcluster import PgCluster
from shop import SHOP_DB, ShopProxy, launch_proxy

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline
clean_shop = shop.clean_shop

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def proxy(clean_shop: PgCluster, tmp_path: Path) -> Iterator[ShopProxy]:
    with launch_proxy(clean_shop, tmp_path / "guardproxy.log") as handle:
        yield handle


def gp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guardproxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def wait_for(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_a_delete_leaves_every_row_is_listed_by_audit_and_undone(proxy, clean_shop) -> None:
    pg = clean_shop
    total = pg.psql("select count(*) from orders", dbname=SHOP_DB)
    with proxy.connect(
        "support-7", autocommit=True, options="-c guard.task=cleanup-1 -c guard.step=3"
    ) as s:
        s.execute("SET guard.reason = 'duplicate orders'")
        cur = s.execute("DELETE FROM orders WHERE id IN (%s, %s)", (2, 3))
        assert cur.statusmessage == "DELETE 2"
        assert s.execute("SELECT count(*) FROM orders WHERE id IN (2, 3)").fetchone() == (0,)
    # every row is still in the table, marked
    assert pg.psql("select count(*) from orders", dbname=SHOP_DB) == total
    assert (
        pg.psql(
            "select string_agg(id || ':' || deleted_by || ':' || delete_reason, ',' order by id) "
            "from orders where deleted_at is not null",
            dbname=SHOP_DB,
        )
        == "2:support-7:duplicate orders,3:support-7:duplicate orders"
    )
    dsn = pg.dsn(dbname=SHOP_DB)
    listed = gp("audit", "deletes", "--agent", "support-7", "--json", "--upstream", dsn)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert sorted(r["primary_key"]["id"] for r in rows) == [2, 3]
    assert {(r["task"], r["step"], r["reason"], r["how"]) for r in rows} == {
        ("cleanup-1", "3", "duplicate orders", "soft")
    }
    dry = gp("undo", "--task", "cleanup-1", "--dry-run", "--upstream", dsn)
    assert dry.returncode == 0 and "2 rows of task cleanup-1 would be restored" in dry.stdout
    assert (
        pg.psql("select count(*) from orders where deleted_at is not null", dbname=SHOP_DB) == "2"
    )
    undone = gp("undo", "--task", "cleanup-1", "--yes", "--upstream", dsn)
    assert undone.returncode == 0 and "restored 2 rows" in undone.stdout, undone.stderr
    assert (
        pg.psql("select count(*) from orders where deleted_at is not null", dbname=SHOP_DB) == "0"
    )
    assert (
        pg.psql(
            "select count(*) from guardproxy.audit_events where decision = 'undo' and task = 'cleanup-1'",
            dbname=SHOP_DB,
        )
        == "1"
    )
    with proxy.connect("support-7", autocommit=True) as s:
        assert s.execute("SELECT count(*) FROM orders WHERE id IN (2, 3)").fetchone() == (2,)


def test_an_update_of_too_many_rows_changes_nothing_and_says_why(proxy, clean_shop) -> None:
    pg = clean_shop
    pg.psql(
        "insert into orders (customer_id, fulfillment_status) "
        "select 1, 'pending' from generate_series(1, 10000)",
        dbname=SHOP_DB,
    )
    before = pg.psql(
        "select md5(string_agg(id || fulfillment_status, ',' order by id)) from orders",
        dbname=SHOP_DB,
    )
    with proxy.connect("support-8", autocommit=True) as s, pytest.raises(psycopg.Error) as exc:
        s.execute("UPDATE orders SET fulfillment_status = 'cancelled' WHERE customer_id = 1")
    message = str(exc.value)
    assert "at most 100 rows" in message and "would have changed" in message, message
    assert "nothing changed" in message
    after = pg.psql(
        "select md5(string_agg(id || fulfillment_status, ',' order by id)) from orders",
        dbname=SHOP_DB,
    )
    assert after == before


def test_reads_past_the_cap_are_cut_with_a_warning_the_agent_sees(proxy, clean_shop) -> None:
    pg = clean_shop
    pg.psql(
        "insert into customers (name, email) select 'c' || g, 'c' || g || '@x' "
        "from generate_series(1, 1500) g",
        dbname=SHOP_DB,
    )
    notices: list[str] = []
    with proxy.connect("analytics-8", autocommit=True) as a:
        a.add_notice_handler(lambda d: notices.append(f"{d.severity}: {d.message_primary}"))
        rows = a.execute("SELECT id, name FROM customers").fetchall()
    assert len(rows) == 1000
    assert "WARNING: result truncated to 1000 rows by policy (limits.max_rows_returned)" in notices


def test_statements_carry_agent_tags_visible_in_pg_stat_activity(proxy, clean_shop) -> None:
    pg = clean_shop
    pg.psql((ROOT / "sql/monitoring.sql").read_text(), dbname=SHOP_DB)
    with proxy.connect(
        "analytics-9", autocommit=True, options="-c guard.task=report-5 -c guard.step=2"
    ) as a:
        a.execute("SELECT pg_backend_pid()")  # denied? no: a plain built-in
    seen: list[str] = []

    def tagged() -> bool:
        with proxy.connect("analytics-9", autocommit=True, options="-c guard.task=report-5") as a:
            a.execute("SELECT count(*) FROM orders /* a comment of the agent's own */")
        seen[:] = [
            pg.psql(
                "select query from pg_stat_activity where application_name = 'analytics-9' "
                "order by backend_start desc limit 1",
                dbname="postgres",
            )
        ]
        return "agent='analytics-9'" in seen[0]

    wait_for(tagged, "the tagged statement in pg_stat_activity")
    query = seen[0]
    assert "a comment of the agent's own" in query  # the agent's comment stays as it was
    assert "agent_type='analytics'" in query and "task='report-5'" in query
    view = pg.psql(
        "select agent || '|' || agent_type || '|' || task from guardproxy_monitoring.agent_activity "
        "where agent = 'analytics-9' limit 1",
        dbname=SHOP_DB,
    )
    assert view in (
        "",
        "analytics-9|analytics|report-5",
    )  # idle backends in another database are not shown


def test_demo_plays_the_three_agent_types_and_prints_the_audit(
    pg: PgCluster, tmp_path: Path
) -> None:
    pg.psql("DROP DATABASE IF EXISTS demo_db WITH (FORCE)", dbname="postgres")
    pg.psql("CREATE DATABASE demo_db OWNER postgres", dbname="postgres")
    try:
        out = gp("demo", "--upstream", pg.dsn("postgres", dbname="demo_db"))
        assert out.returncode == 0, out.stderr[-3000:]
        text = out.stdout
        assert "read payments         -> refused [42501]" in text
        assert "delete order 2        -> DELETE 1" in text
        assert "update all orders     -> refused" in text
        assert "... retried           -> INSERT 0 1" in text
        assert "slow query (timeout)  -> refused [57014]" in text
        assert "soft public.orders {'id': 2} by support-1 task=refund-42" in text
        assert "== DB time per agent (SHOW AGENTS)" in text and "support" in text
    finally:
        pg.psql("DROP DATABASE IF EXISTS demo_db WITH (FORCE)", dbname="postgres")
