"""Prepared statements of both kinds through one registry: SQL-level PREPARE / EXECUTE /
DEALLOCATE and the extended protocol's, each run under the policy and context of the
moment it executes (a reload revokes, a task at EXECUTE is the write's task), and
idempotency keys that protect again once re-claimed after they expired."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import shop
import yaml
from pgcluster import PgCluster
from proofkit import policies_with
from shop import SHOP_DB, ShopProxy, launch_proxy

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline
clean_shop = shop.clean_shop

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def proxy_with(pg: PgCluster, tmp_path: Path, **changes: dict[str, Any]) -> Iterator[ShopProxy]:
    policies = policies_with(tmp_path, **changes) if changes else shop.POLICIES
    with launch_proxy(pg, tmp_path / "guardproxy.log", policies=policies, admin_users="admin") as p:
        try:
            yield p
        except BaseException:
            print(f"\n----- guardproxy log -----\n{p.log()[-6000:]}")
            raise


def scalar(pg: PgCluster, sql: str) -> str:
    return pg.psql(sql, dbname=SHOP_DB)


def gp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guardproxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def pinned(proxy: ShopProxy, agent: str) -> str:
    with psycopg.connect(
        f"postgresql://admin@127.0.0.1:{proxy.port}/guardproxy", autocommit=True
    ) as admin:
        cur = admin.execute("SHOW CLIENTS")
        names = [d.name for d in cur.description or ()]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    return next(r["pinned"] for r in rows if r["agent"] == agent)


# ---------------------------------------------------------------- SQL-level


def test_a_prepared_delete_is_recorded_under_the_task_of_its_execute_and_undone(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    pg = clean_shop
    with proxy_with(pg, tmp_path) as proxy, proxy.connect("support-pd", autocommit=True) as conn:
        conn.execute(
            "/* task='prep-task' */ PREPARE d (bigint) AS DELETE FROM orders WHERE id = $1"
        )
        conn.execute("/* task='exec-task',step='1' */ EXECUTE d(4)")
        assert conn.execute("SELECT count(*) FROM orders WHERE id = 4").fetchone() == (0,)
        assert pinned(proxy, "support-pd") == "false"  # PREPARE no longer pins
    assert scalar(pg, "SELECT task FROM guardproxy.deleted_rows WHERE agent_id = 'support-pd'") == (
        "exec-task"
    )
    assert scalar(pg, "SELECT deleted_at IS NOT NULL FROM orders WHERE id = 4") == "t"
    undone = gp("undo", "--task", "exec-task", "--yes", "--upstream", pg.dsn(dbname=SHOP_DB))
    assert undone.returncode == 0 and "restored 1 rows" in undone.stdout, (
        undone.stdout + undone.stderr
    )
    assert scalar(pg, "SELECT deleted_at IS NULL FROM orders WHERE id = 4") == "t"


def test_sql_and_protocol_prepared_statements_share_one_namespace(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    with (
        proxy_with(clean_shop, tmp_path) as proxy,
        proxy.connect("analytics-ns", autocommit=True) as conn,
    ):
        conn.execute("PREPARE p (int) AS SELECT id FROM orders WHERE id = $1")
        assert conn.execute("EXECUTE p('3')").fetchall() == [(3,)]
        with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
            conn.execute("PREPARE p AS SELECT 1")
        conn.execute("DEALLOCATE p")
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            conn.execute("EXECUTE p(3)")
        # a statement prepared with a Parse message (libpq's PQprepare) runs with EXECUTE
        result = conn.pgconn.prepare(b"by_id", b"SELECT id FROM orders WHERE id = $1::int")
        assert result.status == psycopg.pq.ExecStatus.COMMAND_OK, result.error_message
        assert conn.execute("EXECUTE by_id(5)").fetchall() == [(5,)]
        conn.execute("DEALLOCATE ALL")
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            conn.execute("EXECUTE by_id(5)")


def test_prepare_execute_and_deallocate_must_each_be_alone(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    with (
        proxy_with(clean_shop, tmp_path) as proxy,
        proxy.connect("analytics-mx", autocommit=True) as conn,
    ):
        with pytest.raises(psycopg.errors.FeatureNotSupported) as refused:
            conn.execute("PREPARE x AS SELECT 1; EXECUTE x")
        assert "message of its own" in str(refused.value.diag.message_hint)
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            conn.execute("EXECUTE x")  # nothing was prepared


def test_a_prepared_statement_denied_under_the_policy_of_its_execute(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    """A reload that takes `update` away revokes statements prepared before it: SQL-level and
    driver-prepared alike, and nothing changes."""
    pg = clean_shop
    policies = policies_with(tmp_path)
    with (
        launch_proxy(pg, tmp_path / "guardproxy.log", policies=policies) as proxy,
        proxy.connect("fulfillment-rl", autocommit=True) as conn,
    ):
        conn.execute("PREPARE u (bigint) AS UPDATE orders SET tracking_number = 'A' WHERE id = $1")
        cur = conn.cursor()
        cur.execute("UPDATE orders SET tracking_number = %s WHERE id = %s", ("B", 4), prepare=True)
        assert scalar(pg, "SELECT tracking_number FROM orders WHERE id = 4") == "B"
        doc_path = policies / "fulfillment.yaml"
        doc = yaml.safe_load(doc_path.read_text())
        doc["tables"]["orders"]["ops"] = ["select"]
        doc["tables"]["orders"].pop("update_columns", None)
        doc_path.write_text(yaml.safe_dump(doc))
        since = len(proxy.log())
        proxy.proc.send_signal(signal.SIGHUP)
        proxy.wait_for_log("policies reloaded", after=since)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("EXECUTE u(5)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute(
                "UPDATE orders SET tracking_number = %s WHERE id = %s", ("C", 4), prepare=True
            )
    assert scalar(pg, "SELECT coalesce(tracking_number, '') FROM orders WHERE id = 5") == ""
    assert scalar(pg, "SELECT tracking_number FROM orders WHERE id = 4") == "B"


# ---------------------------------------------------------------- idempotency keys


def keyed(key: str, reason: str) -> str:
    return (
        f"/* idempotency_key='{key}' */ INSERT INTO order_state_log "
        "(order_id, previous_status, new_status, changed_by, reason) "
        f"VALUES (2, 'shipped', 'delivered', 'support-k', '{reason}')"
    )


def test_a_key_reclaimed_after_it_expired_protects_the_new_write(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    pg = clean_shop
    log_rows = "SELECT count(*) FROM order_state_log WHERE changed_by = 'support-k'"
    with (
        proxy_with(pg, tmp_path, support={"idempotency": {"mode": "explicit"}}) as proxy,
        proxy.connect("support-k", autocommit=True) as conn,
    ):
        conn.execute(keyed("k-exp", "first"))
        conn.execute(keyed("k-exp", "first"))  # a retry: replayed
        assert scalar(pg, log_rows) == "1"
        # time passes in the ledger: the key expires (no sleeping)
        pg.psql(
            "UPDATE guardproxy.idempotency_keys SET expires_at = now() - interval '1 second' "
            "WHERE key LIKE '%k-exp%'",
            dbname=SHOP_DB,
        )
        conn.execute(keyed("k-exp", "second"))  # claimed anew: runs once
        conn.execute(keyed("k-exp", "second"))  # and its retry is a replay again
        assert scalar(pg, log_rows) == "2"
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute(keyed("k-exp", "first"))  # the old request no longer fits the key
        assert scalar(pg, log_rows) == "2"
    expires = scalar(
        pg,
        "SELECT expires_at > now() + interval '1 hour' FROM guardproxy.idempotency_keys "
        "WHERE key LIKE '%k-exp%'",
    )
    assert expires == "t"


def test_a_simple_query_delete_is_soft_and_capped_like_any_other(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    """The simple protocol (PQexec, psql): a managed write runs the judged text."""
    pg = clean_shop
    with (
        proxy_with(pg, tmp_path, support={"tables": {"orders": {"max_rows_affected": 1}}}) as proxy,
        proxy.connect("support-sq", autocommit=True) as conn,
    ):
        done = conn.pgconn.exec_(b"DELETE FROM orders WHERE id = 4")
        assert done.status == psycopg.pq.ExecStatus.COMMAND_OK, done.error_message
        assert done.command_status == b"DELETE 1"
        refused = conn.pgconn.exec_(b"DELETE FROM orders WHERE customer_id = 1")
        assert refused.status == psycopg.pq.ExecStatus.FATAL_ERROR
        assert refused.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"54000"
    assert scalar(pg, "SELECT count(*) FROM orders") == "6"  # every row still there
    assert (
        scalar(pg, "SELECT string_agg(id::text, ',') FROM orders WHERE deleted_at IS NOT NULL")
        == "4"
    )
