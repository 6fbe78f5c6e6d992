"""The extended-protocol cases that once ran a decision on the wrong statement, through the
real proxy with real drivers and raw protocol messages; each checked by its effect on
the database, not only by what the client was told."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import shop
from pgcluster import PgCluster
from proofkit import policies_with
from shop import SHOP_DB, ShopProxy, launch_proxy

from guardproxy.protocol import codec

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline
clean_shop = shop.clean_shop


@contextlib.contextmanager
def proxy_with(pg: PgCluster, tmp_path: Path, **changes: dict[str, Any]) -> Iterator[ShopProxy]:
    policies = policies_with(tmp_path, **changes) if changes else shop.POLICIES
    with launch_proxy(pg, tmp_path / "guardproxy.log", policies=policies) as proxy:
        try:
            yield proxy
        except BaseException:
            print(f"\n----- guardproxy log -----\n{proxy.log()[-6000:]}")
            raise


def statuses(pg: PgCluster) -> dict[int, tuple[str, bool]]:
    """Every order's status and whether it is soft-deleted, as the owner sees them."""
    out = pg.psql(
        "SELECT string_agg(id || ':' || fulfillment_status || ':' || (deleted_at IS NOT NULL), ',' "
        "ORDER BY id) FROM orders",
        dbname=SHOP_DB,
    )
    result = {}
    for item in out.split(","):
        ident, status, deleted = item.split(":")
        result[int(ident)] = (status, deleted == "true")
    return result


def audit_decisions(pg: PgCluster, agent: str) -> list[str]:
    out = pg.psql(
        f"SELECT coalesce(string_agg(decision, ',' ORDER BY id), '') FROM guardproxy.audit_events "
        f"WHERE agent_id = '{agent}'",
        dbname=SHOP_DB,
    )
    return [d for d in out.split(",") if d]


def wait_for_audit(pg: PgCluster, agent: str, count: int) -> list[str]:
    deadline = time.monotonic() + 10
    while True:
        got = audit_decisions(pg, agent)
        if len(got) >= count or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


# ---------------------------------------------------------------- raw protocol


class Raw:
    """A raw protocol client (trust login), every read bounded."""

    def __init__(self, port: int, agent: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(codec.build_startup({"user": agent, "database": SHOP_DB}))
        self.buf = b""
        self.until(b"Z")

    def send(self, *messages: bytes) -> None:
        self.sock.sendall(b"".join(messages))

    def until(self, kind: bytes, count: int = 1) -> list[tuple[bytes, bytes]]:
        """Messages up to and including the ``count``-th of type ``kind``."""
        got: list[tuple[bytes, bytes]] = []
        seen = 0
        while True:
            while len(self.buf) >= 5:
                (length,) = struct.unpack_from("!i", self.buf, 1)
                if len(self.buf) < 1 + length:
                    break
                raw, self.buf = self.buf[: 1 + length], self.buf[1 + length :]
                got.append((raw[:1], raw))
                if raw[:1] == kind:
                    seen += 1
                    if seen == count:
                        return got
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed; got {got!r}")
            self.buf += chunk

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(codec.TERMINATE)
        self.sock.close()


def parse(name: bytes, sql: str) -> bytes:
    return codec.build_parse(name, sql.encode(), b"\x00\x00")


def bind(portal: bytes, statement: bytes, *values: bytes) -> bytes:
    body = portal + b"\x00" + statement + b"\x00" + struct.pack("!hh", 0, len(values))
    for value in values:
        body += struct.pack("!i", len(value)) + value
    return codec.message(b"B", body + struct.pack("!h", 0))


def execute(portal: bytes = b"", limit: int = 0) -> bytes:
    return codec.message(b"E", portal + b"\x00" + struct.pack("!i", limit))


def errors(messages: list[tuple[bytes, bytes]]) -> list[dict[str, str]]:
    return [codec.error_fields(raw) for kind, raw in messages if kind == b"E"]


def tags(messages: list[tuple[bytes, bytes]]) -> list[str]:
    return [codec.command_tag(raw).decode() for kind, raw in messages if kind == b"C"]


# ---------------------------------------------------------------- drivers


def test_psycopg_select_after_a_delete_on_the_unnamed_statement_returns_its_row(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    with (
        proxy_with(clean_shop, tmp_path) as proxy,
        proxy.connect("support-1", autocommit=True) as conn,
    ):
        deleted = conn.execute("DELETE FROM orders WHERE id = %s", (4,))
        assert deleted.statusmessage == "DELETE 1"
        cur = conn.execute("SELECT id FROM orders WHERE id = %s", (5,))
        assert cur.fetchall() == [(5,)] and cur.statusmessage == "SELECT 1"
    assert statuses(clean_shop)[4][1] and not statuses(clean_shop)[5][1]


async def test_asyncpg_executemany_of_a_managed_write_is_capped_and_audited(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    with proxy_with(
        clean_shop, tmp_path, support={"tables": {"orders": {"max_rows_affected": 1}}}
    ) as proxy:
        conn = await asyncpg.connect(proxy.dsn("support-em"), timeout=10)
        try:
            await conn.executemany(
                "UPDATE orders SET fulfillment_status = $1 WHERE id = $2",
                [("packed", 4), ("packed", 5)],
            )
            assert statuses(clean_shop)[4][0] == "packed" and statuses(clean_shop)[5][0] == "packed"
            # one execution of the batch changes two rows, past the cap: the whole batch goes
            with pytest.raises(asyncpg.PostgresError) as refused:
                await conn.executemany(
                    "UPDATE orders SET fulfillment_status = $1 WHERE customer_id = $2",
                    [("cancelled", 3), ("cancelled", 1)],
                )
            assert refused.value.sqlstate == "54000"
        finally:
            await conn.close()
    after = statuses(clean_shop)
    assert after[4][0] == "packed" and after[1][0] == "delivered" and after[2][0] == "shipped"
    decisions = wait_for_audit(clean_shop, "support-em", 4)
    assert decisions.count("allowed") >= 2 and "denied" in decisions, decisions


# ---------------------------------------------------------------- write caps, raw


@pytest.fixture
def capped(clean_shop: PgCluster, tmp_path: Path) -> Iterator[ShopProxy]:
    """support may change at most one order row per statement."""
    with proxy_with(
        clean_shop, tmp_path, support={"tables": {"orders": {"max_rows_affected": 1}}}
    ) as proxy:
        yield proxy


UPDATE_BY_CUSTOMER = "UPDATE orders SET fulfillment_status = 'returned' WHERE customer_id = $1"


def test_a_row_limit_on_the_execute_of_a_capped_write_is_refused(capped, clean_shop) -> None:
    before = statuses(clean_shop)
    agent = Raw(capped.port, "support-rl")
    try:
        agent.send(parse(b"", UPDATE_BY_CUSTOMER), bind(b"", b"", b"1"), execute(b"", 1))
        agent.send(codec.SYNC)
        got = agent.until(b"Z")
        assert errors(got) and errors(got)[0]["C"] == "0A000", got
    finally:
        agent.close()
    assert statuses(clean_shop) == before


def test_each_execute_before_a_sync_is_counted_and_the_round_rolls_back(capped, clean_shop) -> None:
    before = statuses(clean_shop)
    agent = Raw(capped.port, "support-pairs")
    try:
        agent.send(
            parse(b"w", UPDATE_BY_CUSTOMER),
            bind(b"", b"w", b"3"),  # one row: within the cap
            execute(),
            bind(b"", b"w", b"1"),  # two rows: past it
            execute(),
            codec.SYNC,
        )
        got = agent.until(b"Z")
        assert tags(got) == ["UPDATE 1"], got
        assert [e["C"] for e in errors(got)] == ["54000"], got
    finally:
        agent.close()
    # an error in the round rolls the whole implicit transaction back, as Postgres does
    assert statuses(clean_shop) == before


def test_a_bind_in_one_round_and_its_execute_in_the_next_is_still_capped(
    capped, clean_shop
) -> None:
    before = statuses(clean_shop)
    agent = Raw(capped.port, "support-late")
    try:
        agent.send(codec.build_query("BEGIN"))
        agent.until(b"Z")
        agent.send(parse(b"w", UPDATE_BY_CUSTOMER), bind(b"p", b"w", b"1"), codec.SYNC)
        agent.until(b"Z")
        agent.send(execute(b"p"), codec.SYNC)
        got = agent.until(b"Z")
        assert [e["C"] for e in errors(got)] == ["54000"], got
        assert got[-1][1][5:6] == b"E"  # the transaction is aborted, as after any error
        agent.send(codec.build_query("COMMIT"))
        assert tags(agent.until(b"Z")) == ["ROLLBACK"]
    finally:
        agent.close()
    assert statuses(clean_shop) == before


def test_a_parse_pipelined_behind_a_write_runs_under_its_own_decision(capped, clean_shop) -> None:
    agent = Raw(capped.port, "support-pipe")
    try:
        agent.send(
            parse(b"", "DELETE FROM orders WHERE id = $1"),
            bind(b"", b"", b"4"),
            execute(),
            parse(b"", "SELECT id, fulfillment_status FROM orders WHERE id = $1"),
            bind(b"", b"", b"5"),
            execute(),
            codec.SYNC,
        )
        got = agent.until(b"Z")
        assert not errors(got), errors(got)
        assert tags(got) == ["DELETE 1", "SELECT 1"], got
        rows = [raw for kind, raw in got if kind == b"D"]
        assert len(rows) == 1 and b"pending" in rows[0]
    finally:
        agent.close()
    after = statuses(clean_shop)
    assert after[4][1] and not after[5][1]  # soft-deleted only what the DELETE named


# ---------------------------------------------------------------- read caps


def test_a_capped_read_followed_by_another_message_stays_capped(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    with proxy_with(clean_shop, tmp_path, analytics={"limits": {"max_rows_returned": 2}}) as proxy:
        agent = Raw(proxy.port, "analytics-cap")
        try:
            agent.send(
                parse(b"", "SELECT id FROM orders WHERE id > 0"),
                bind(b"", b""),
                execute(),
                parse(b"", "SELECT 1"),
                bind(b"", b""),
                execute(),
                codec.SYNC,
            )
            got = agent.until(b"Z")
        finally:
            agent.close()
    rows = [raw for kind, raw in got if kind == b"D"]
    assert len(rows) == 3, got  # two orders, then the one row of SELECT 1
    assert tags(got) == ["SELECT 2", "SELECT 1"]


# ---------------------------------------------------------------- pinning and timeouts


def clients(proxy: ShopProxy) -> list[dict[str, str]]:
    with psycopg.connect(
        f"postgresql://admin@127.0.0.1:{proxy.port}/guardproxy", autocommit=True
    ) as admin:
        cur = admin.execute("SHOW CLIENTS")
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def test_literals_and_denied_statements_pin_nothing(clean_shop: PgCluster, tmp_path: Path) -> None:
    with (
        launch_proxy(clean_shop, tmp_path / "guardproxy.log", admin_users="admin") as proxy,
        proxy.connect("analytics-pin", autocommit=True) as conn,
    ):
        conn.execute("SELECT 'on hold' AS a, 'temp' AS b FROM orders WHERE id = 1").fetchall()
        for denied in ("LISTEN jobs", "CREATE TEMP TABLE t (a int)", "SELECT pg_advisory_lock(1)"):
            with pytest.raises(psycopg.Error):
                conn.execute(denied)
        mine = [c for c in clients(proxy) if c["agent"] == "analytics-pin"]
        assert mine and mine[0]["pinned"] == "false", mine


def test_denied_statements_hold_no_server_of_the_agent_types_budget(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    with proxy_with(
        clean_shop, tmp_path, analytics={"limits": {"max_server_connections": 1}}
    ) as proxy:
        first = proxy.connect("analytics-a", autocommit=True)
        second = proxy.connect("analytics-b", autocommit=True)
        try:
            for conn in (first, second):
                with pytest.raises(psycopg.Error):
                    conn.execute("CREATE TEMP TABLE t (a int)")
            third = proxy.connect("analytics-c", autocommit=True)
            try:
                assert third.execute("SELECT count(*) FROM orders WHERE id > 0").fetchone() == (6,)
            finally:
                third.close()
        finally:
            first.close()
            second.close()


def test_the_pool_wait_error_names_the_limit_that_binds(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    policies = policies_with(tmp_path, analytics={"limits": {"max_server_connections": 1}})
    with (
        launch_proxy(
            clean_shop, tmp_path / "guardproxy.log", policies=policies, pool_acquire_timeout=1
        ) as proxy,
        proxy.connect("analytics-hold") as holder,
    ):
        holder.execute("SELECT 1 FROM orders WHERE id = 1")  # a transaction, left open
        with (
            proxy.connect("analytics-wait", autocommit=True) as waiter,
            pytest.raises(psycopg.Error) as waited,
        ):
            waiter.execute("SELECT 1 FROM orders WHERE id = 1")
        holder.rollback()
    message = str(waited.value)
    assert waited.value.sqlstate == "53300"
    assert "limits.max_server_connections" in message and "analytics" in message, message


def test_a_pinned_sessions_transaction_timeout_starts_at_begin(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    with (
        proxy_with(
            clean_shop,
            tmp_path,
            support={
                "statements": ["read", "write", "notify"],
                "timeouts": {"transaction_timeout": "2s"},
            },
        ) as proxy,
        proxy.connect("support-pinned", autocommit=True) as conn,
    ):
        conn.execute("LISTEN orders_changed")  # pins the session to its server
        time.sleep(2.5)  # idle, outside any transaction: no transaction is running
        with conn.transaction():
            assert conn.execute("SELECT 1 FROM orders WHERE id = 1").fetchone() == (1,)
        assert conn.execute("SELECT 2 FROM orders WHERE id = 1").fetchone() == (2,)


# ---------------------------------------------------------------- context


def test_a_driver_prepared_statement_follows_the_sessions_new_principals(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    """psycopg prepares a statement after five runs; its row filter must follow the session."""
    with (
        proxy_with(
            clean_shop,
            tmp_path,
            support={"row_filters": {"orders": "customer_id = ANY({principals})"}},
        ) as proxy,
        proxy.connect("support-pp", autocommit=True) as conn,
    ):
        conn.prepare_threshold = 1
        query = "SELECT id FROM orders WHERE id > %s ORDER BY id"
        conn.execute("SET guard.principals = '1'")
        for _ in range(3):
            assert conn.execute(query, (0,)).fetchall() == [(1,), (2,)]
        conn.execute("SET guard.principals = '2'")
        assert conn.execute(query, (0,)).fetchall() == [(3,), (6,)]
        conn.execute("SET guard.principals = '3'")
        assert conn.execute(query, (0,)).fetchall() == [(4,)]


# ---------------------------------------------------------------- notifications


NOTIFYING = {"statements": ["read", "write", "notify"]}


def test_psycopg_recognises_its_own_notifications(clean_shop: PgCluster, tmp_path: Path) -> None:
    with (
        proxy_with(clean_shop, tmp_path, support=NOTIFYING) as proxy,
        proxy.connect("support-n", autocommit=True) as conn,
    ):
        conn.execute("LISTEN jobs")
        conn.execute("NOTIFY jobs, 'hello'")
        note = next(conn.notifies(timeout=5, stop_after=1))
        assert note.payload == "hello" and note.pid == conn.info.backend_pid


async def test_asyncpg_recognises_its_own_notifications(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    with proxy_with(clean_shop, tmp_path, support=NOTIFYING) as proxy:
        conn = await asyncpg.connect(proxy.dsn("support-an"), timeout=10)
        try:
            got: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            await conn.add_listener("jobs", lambda c, pid, ch, payload: got.set_result(pid))
            await conn.execute("NOTIFY jobs, 'hi'")
            assert await asyncio.wait_for(got, 5) == conn.get_server_pid()
        finally:
            await conn.close()
