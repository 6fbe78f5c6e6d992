"""What reaches the client and the record, through the real proxy: the byte cap on row
data (a whole table in one row), caps over several FETCHes of one message and over
COPY, the judge's notices, timeouts that name their limit, and audit events that keep
their own time, the rule that decided and what became of the write upstream."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import shop
from pgcluster import PgCluster
from proofkit import policies_with
from shop import SHOP_DB, ShopProxy, launch_proxy

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline
clean_shop = shop.clean_shop


@contextlib.contextmanager
def proxy_with(pg: PgCluster, tmp_path: Path, **changes: dict[str, Any]) -> Iterator[ShopProxy]:
    policies = policies_with(tmp_path, **changes)
    with launch_proxy(pg, tmp_path / "guardproxy.log", policies=policies) as proxy:
        try:
            yield proxy
        except BaseException:
            print(f"\n----- guardproxy log -----\n{proxy.log()[-6000:]}")
            raise


def events(pg: PgCluster, agent: str, count: int) -> list[dict[str, Any]]:
    """The agent's audit events (waiting, bounded, for ``count`` of them)."""
    deadline = time.monotonic() + 10
    while True:
        out = pg.psql(
            "SELECT coalesce(json_agg(e ORDER BY id), '[]') FROM (SELECT id, decision, rule, "
            "outcome, rows, reason, at FROM guardproxy.audit_events "
            f"WHERE agent_id = '{agent}') e",
            dbname=SHOP_DB,
        )
        got = json.loads(out)
        if len(got) >= count or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


# ---------------------------------------------------------------- byte caps


def test_a_whole_table_in_one_row_is_bounded_by_the_byte_cap(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    with (
        proxy_with(clean_shop, tmp_path, analytics={"limits": {"max_bytes_returned": 40}}) as proxy,
        proxy.connect("analytics-bytes", autocommit=True) as conn,
    ):
        small = conn.execute("SELECT id FROM orders WHERE id < 3 ORDER BY id").fetchall()
        assert small == [(1,), (2,)]
        notes: list[str] = []
        conn.add_notice_handler(lambda d: notes.append(d.message_primary or ""))
        cur = conn.execute(
            "SELECT string_agg(name, ', ') FROM customers WHERE id > 0"  # 69 bytes in one row
        )
        assert cur.fetchall() == [] and cur.statusmessage == "SELECT 0"
        assert any("max_bytes_returned" in n for n in notes), notes


def test_the_byte_cap_in_error_mode_refuses_the_result(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    with (
        proxy_with(
            clean_shop,
            tmp_path,
            analytics={"limits": {"max_bytes_returned": 40, "on_rows_returned_over": "error"}},
        ) as proxy,
        proxy.connect("analytics-berr", autocommit=True) as conn,
    ):
        with pytest.raises(psycopg.errors.ProgramLimitExceeded) as refused:
            conn.execute("SELECT string_agg(name, ', ') FROM customers WHERE id > 0").fetchall()
        assert "40 bytes" in str(refused.value)


def test_several_fetches_of_one_cursor_in_one_message_share_its_cap(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    with (
        proxy_with(clean_shop, tmp_path, analytics={"limits": {"max_rows_returned": 4}}) as proxy,
        proxy.connect("analytics-fetch") as conn,
    ):
        conn.execute("DECLARE c CURSOR FOR SELECT g FROM generate_series(1, 20) AS g")
        rows = 0
        conn.pgconn.send_query(b"FETCH 3 FROM c; FETCH 3 FROM c")
        while (result := conn.pgconn.get_result()) is not None:
            rows += result.ntuples
        assert rows == 4
        conn.rollback()


def test_copy_to_stdout_is_counted_row_by_row(clean_shop: PgCluster, tmp_path: Path) -> None:
    with (
        proxy_with(clean_shop, tmp_path, analytics={"limits": {"max_rows_returned": 2}}) as proxy,
        proxy.connect("analytics-copy", autocommit=True) as conn,
    ):
        cur = conn.cursor()
        with cur.copy("COPY (SELECT id FROM orders WHERE id > 0) TO STDOUT") as copy:
            lines = [bytes(row) for row in copy]
        assert len(lines) == 2, lines


# ---------------------------------------------------------------- what the judge says


def test_a_principals_filter_without_principals_says_so(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    with (
        proxy_with(
            clean_shop,
            tmp_path,
            support={"row_filters": {"orders": "customer_id = ANY({principals})"}},
        ) as proxy,
        proxy.connect("support-np", autocommit=True) as conn,
    ):
        notes: list[str] = []
        conn.add_notice_handler(lambda d: notes.append(d.message_primary or ""))
        assert conn.execute("SELECT id FROM orders WHERE id > 0").fetchall() == []
        assert any("principals" in n for n in notes), notes


def test_a_statement_timeout_names_the_policys_limit(clean_shop: PgCluster, tmp_path: Path) -> None:
    with (
        proxy_with(
            clean_shop, tmp_path, analytics={"timeouts": {"statement_timeout": "100ms"}}
        ) as proxy,
        proxy.connect("analytics-slow", autocommit=True) as conn,
    ):
        with pytest.raises(psycopg.errors.QueryCanceled) as cancelled:
            conn.execute("SELECT count(*) FROM generate_series(1, 500000000) AS g WHERE g > 0")
        diag = cancelled.value.diag
        assert "statement_timeout" in (diag.message_primary or "") + (diag.message_hint or "")
        assert diag.message_hint


# ---------------------------------------------------------------- the record


def test_audit_events_keep_their_time_rule_and_outcome(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    pg = clean_shop
    with (
        proxy_with(pg, tmp_path, support={"tables": {"orders": {"max_rows_affected": 1}}}) as proxy,
        proxy.connect("support-rec", autocommit=True) as conn,
    ):
        conn.execute("DELETE FROM orders WHERE id = %s", (4,))  # soft delete: succeeded
        time.sleep(0.05)
        with pytest.raises(psycopg.errors.ProgramLimitExceeded):
            conn.execute("UPDATE orders SET fulfillment_status = 'packed' WHERE customer_id = 1")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE orders SET fulfillment_status = 'lost' WHERE id = 5")
    got = events(pg, "support-rec", 3)
    assert [(e["decision"], e["outcome"]) for e in got] == [
        ("rewritten", "succeeded"),
        ("denied", "undone"),
        ("allowed", "failed"),
    ], got
    assert got[0]["rule"] == "tables.orders.soft_delete"
    assert got[1]["rule"] == "tables.orders.max_rows_affected" and got[1]["rows"] == 2
    assert "23514" in got[2]["reason"]
    assert got[0]["at"] != got[1]["at"]  # each its own time, not its batch's
