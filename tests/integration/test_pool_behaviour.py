"""The pool under faults: exhaustion, clients that die, cancels, servers that die.

Real clients (psycopg, asyncpg, raw sockets) through a real proxy process to the
session's real Postgres. Blocking client calls run in threads and every wait is
bounded, so a proxy that hangs fails the test instead of hanging it. Tests that
stop Postgres come last and always start it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import psycopg
import pytest
from conftest import wait_until
from pgcluster import PgCluster, free_port
from psycopg import errors
from psycopg.pq import TransactionStatus
from wirekit import (
    WireClient,
    errors_in,
    eventually,
    fatal_in,
    log_lines_about,
    start_proxy_with_deadline,  # noqa: F401  (the start_proxy fixture, with a deadline)
    startup_packet,
)

from guardproxy.protocol import codec

WAIT = 15.0


@pytest.fixture
def table(pg: PgCluster) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:10]}"
    pg.psql(f"CREATE TABLE {name} (id int PRIMARY KEY, note text)", user="app_owner")
    yield name
    # A failed test may leave a transaction holding the table until its proxy stops: do not wait.
    with contextlib.suppress(RuntimeError):
        pg.psql(f"SET lock_timeout = '1s'; DROP TABLE IF EXISTS {name}", user="app_owner")


@pytest.fixture
def threads() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(4)
    yield pool
    # A call still stuck (a failed test) ends when the proxy is stopped; do not wait for it.
    pool.shutdown(wait=False, cancel_futures=True)


def connect(proxy, agent: str, autocommit: bool = True) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(agent), autocommit=autocommit, connect_timeout=10)


def sleeping(pg: PgCluster, seconds: str) -> list[int]:
    """Backend pids running ``pg_sleep(<seconds>)`` right now."""
    out = pg.psql(
        "SELECT pid FROM pg_stat_activity WHERE state = 'active' "
        f"AND query LIKE '%pg_sleep({seconds})%' AND pid <> pg_backend_pid()"
    )
    return [int(p) for p in out.split()]


def backend_exists(pg: PgCluster, pid: int) -> bool:
    return pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") == "1"


class Gate:
    """An advisory lock held by a direct connection to Postgres (not through the proxy).

    A query through the proxy that takes it shared waits until the test opens the
    gate, so "still running" is a fact the test controls, not a race against a timer.
    """

    def __init__(self, pg: PgCluster) -> None:
        self.pg = pg
        self.key = int(uuid.uuid4().int % 2_000_000_000) + 1
        self.conn = psycopg.connect(pg.dsn(), autocommit=True, connect_timeout=10)
        self.conn.execute("SELECT pg_advisory_lock(%s)", (self.key,))
        self.opened = False

    def sql(self, label: str) -> str:
        return f"SELECT '{label}' FROM pg_advisory_xact_lock_shared({self.key})"

    def waiting(self) -> list[int]:
        out = self.pg.psql(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' "
            f"AND objid = {self.key} AND NOT granted"
        )
        return [int(p) for p in out.split()]

    def open(self) -> None:
        if not self.opened:
            self.opened = True
            self.conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))


@pytest.fixture
def gate(pg: PgCluster) -> Iterator[Gate]:
    g = Gate(pg)
    yield g
    g.conn.close()


FRESH_TRANSACTION = (
    "SELECT now() = statement_timestamp(), pg_current_xact_id_if_assigned() IS NULL, "
    "(SELECT count(*) FROM {table})"
)


# ---------------------------------------------------------------- exhaustion


def test_pool_acquire_timeout_fails_fast_with_53300_and_recovers(
    start_proxy, table, threads
) -> None:
    proxy = start_proxy(pool_size=1, pool_acquire_timeout=1)
    holder = connect(proxy, "holder", autocommit=False)
    waiter = connect(proxy, "waiter")
    try:
        holder.execute(f"INSERT INTO {table} VALUES (1, 'held')")  # holds the only server
        attempt = threads.submit(lambda: waiter.execute("SELECT 'got through'").fetchone())
        with pytest.raises(errors.TooManyConnections) as info:
            attempt.result(timeout=WAIT)  # never hangs
        diag = info.value.diag
        assert diag.sqlstate == "53300"
        assert "busy" in (diag.message_primary or "")
        assert "retry" in (diag.message_hint or "").lower(), diag.message_hint
        assert "pool_size" in (diag.message_hint or "")

        holder.commit()
        # the same waiter connection works again and sees the committed row
        assert waiter.execute(f"SELECT note FROM {table}").fetchone() == ("held",)
        assert waiter.info.transaction_status == TransactionStatus.IDLE
    finally:
        holder.close()
        waiter.close()
    assert proxy.alive()


async def test_a_parse_that_got_no_server_leaves_no_statement(start_proxy, table) -> None:
    # The unnamed Parse waits for a server that never comes: it fails (53300), and as
    # for any failed Parse there is no unnamed statement afterwards; a later Describe of
    # it is told so, rather than finding the statement that was never taken.
    proxy = start_proxy(pool_size=1, pool_acquire_timeout=1)
    holder = connect(proxy, "holder", autocommit=False)
    try:
        holder.execute(f"INSERT INTO {table} VALUES (1, 'held')")  # holds the only server
        async with await WireClient.connect(proxy.port) as raw:
            await raw.login("waiter")
            await raw.send(
                codec.build_parse(b"", b"SELECT 'never taken'", b"\x00\x00") + codec.SYNC
            )
            failed = await raw.read_until(b"Z", timeout=WAIT)
            assert [e["C"] for e in errors_in(failed)] == ["53300"], failed
            holder.commit()
            describe = codec.message(b"D", b"S\x00")
            await raw.send(describe + codec.SYNC)
            after = await raw.read_until(b"Z", timeout=WAIT)
            assert [(e["C"], e["M"]) for e in errors_in(after)] == [
                ("26000", "unnamed prepared statement does not exist")
            ], after
            assert not [m for m in after if m.kind in (b"t", b"T")], after
    finally:
        holder.close()
    assert proxy.alive()


def test_waiter_gets_the_server_when_it_comes_back_in_time(start_proxy, table, threads) -> None:
    proxy = start_proxy(pool_size=1, pool_acquire_timeout=20)
    with connect(proxy, "holder", autocommit=False) as holder, connect(proxy, "waiter") as waiter:
        holder.execute(f"INSERT INTO {table} VALUES (1, 'first')")
        attempt = threads.submit(
            lambda: waiter.execute(f"SELECT count(*), 'waited' FROM {table}").fetchone()
        )
        time.sleep(0.5)  # let the waiter queue up (if it has not, the test only proves less)
        assert not attempt.done()
        holder.commit()
        assert attempt.result(timeout=WAIT) == (1, "waited")


# ---------------------------------------------------------------- clients that die


KILLED_CLIENT = """
import sys, psycopg
conn = psycopg.connect(sys.argv[1], connect_timeout=10)
conn.execute("INSERT INTO {table} VALUES (1, 'never committed')")
print(conn.execute("SELECT pg_backend_pid()").fetchone()[0], flush=True)
sys.stdin.read()
"""


def test_client_killed_mid_transaction_rolls_back_and_next_client_gets_clean_server(
    start_proxy, pg, table
) -> None:
    proxy = start_proxy(pool_size=1)
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT.format(table=table), proxy.dsn("doomed")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        ready, _, _ = select.select([child.stdout], [], [], WAIT)
        assert ready, "the client did not get into its transaction"
        old_pid = int(child.stdout.readline())
        assert pg.psql(f"SELECT state FROM pg_stat_activity WHERE pid = {old_pid}") == (
            "idle in transaction"
        )
        os.kill(child.pid, signal.SIGKILL)
        child.wait(WAIT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(WAIT)
        child.stdin.close()
        child.stdout.close()

    # pool_size 1: the next client gets either that server rolled back, or a new one
    with connect(proxy, "next") as conn:
        row = conn.execute(FRESH_TRANSACTION.format(table=table)).fetchone()
        assert row == (True, True, 0)
        assert conn.info.transaction_status == TransactionStatus.IDLE
    assert int(pg.psql(f"SELECT count(*) FROM {table}")) == 0
    wait_until(
        lambda: (
            pg.psql(
                f"SELECT count(*) FROM pg_stat_activity WHERE pid = {old_pid} "
                "AND state LIKE 'idle in transaction%'"
            )
            == "0"
        ),
        WAIT,
        "the killed client's transaction to end",
    )
    assert proxy.alive()


async def test_client_reset_mid_transaction_rolls_back_before_anyone_gets_the_server(
    start_proxy, pg, table
) -> None:
    proxy = start_proxy(pool_size=1)
    async with await WireClient.connect(proxy.port) as raw:
        await raw.login()
        assert not errors_in(await raw.query("BEGIN"))
        assert not errors_in(await raw.query(f"INSERT INTO {table} VALUES (1, 'reset')"))
        old_pid = int(await raw.scalar("SELECT pg_backend_pid()"))
        await raw.abort()  # TCP reset, no Terminate
    with connect(proxy, "next") as conn:
        row = conn.execute(FRESH_TRANSACTION.format(table=table)).fetchone()
        assert row == (True, True, 0)
        assert conn.info.transaction_status == TransactionStatus.IDLE
    assert int(pg.psql(f"SELECT count(*) FROM {table}")) == 0
    await eventually(
        lambda: (
            pg.psql(
                f"SELECT count(*) FROM pg_stat_activity WHERE pid = {old_pid} "
                "AND state LIKE 'idle in transaction%'"
            )
            == "0"
        ),
        WAIT,
        "the reset client's transaction to end",
    )
    assert proxy.alive()


async def test_client_leaving_right_after_a_set_does_not_leak_its_server(start_proxy, pg) -> None:
    # SET makes the proxy read the session settings back once the server is idle;
    # a client that leaves during that read-back must not take the server with it.
    proxy = start_proxy(pool_size=1, pool_acquire_timeout=2)
    for i in range(30):
        async with await WireClient.connect(proxy.port) as raw:
            await raw.login()
            msgs = await raw.query(f"SET application_name = 'probe-{i}'")
            assert not errors_in(msgs), f"round {i}: {errors_in(msgs)}"
            await raw.abort()
    # pool_size 1: a single lost server would starve everyone from now on
    for _ in range(3):
        with connect(proxy, "after") as conn:
            assert conn.execute("SELECT 'pool intact'").fetchone() == ("pool intact",)
    wait_until(
        lambda: (
            int(
                pg.psql(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app_owner' "
                    "AND backend_type = 'client backend'"
                )
            )
            <= 1
        ),
        WAIT,
        "at most pool_size server connections",
    )
    assert proxy.alive()


async def test_max_client_conn_exceeded_is_fatal_53300(start_proxy) -> None:
    proxy = start_proxy(max_client_conn=2)
    first, second = connect(proxy, "first"), connect(proxy, "second")
    try:
        async with await WireClient.connect(proxy.port) as raw:
            await raw.send(startup_packet({"user": "third", "database": "app"}))
            fatal = fatal_in(await raw.read_until_eof(WAIT))
        assert fatal["C"] == "53300"
        assert "max_client_conn" in fatal["M"] + fatal.get("H", "")
        with pytest.raises(psycopg.OperationalError, match="too many client connections"):
            connect(proxy, "fourth")
        # the two admitted clients are unaffected
        assert first.execute("SELECT 'first ok'").fetchone() == ("first ok",)
        first.close()

        def third_admitted() -> bool:
            try:
                with connect(proxy, "third") as conn:
                    return conn.execute("SELECT 'third ok'").fetchone() == ("third ok",)
            except psycopg.OperationalError:
                return False

        await eventually(third_admitted, WAIT, "a freed slot to admit a new client")
        assert second.execute("SELECT 'second ok'").fetchone() == ("second ok",)
    finally:
        first.close()
        second.close()
    assert proxy.alive()
    assert len(log_lines_about(proxy.log(), raw.local_port)) == 1


# ---------------------------------------------------------------- cancel


def test_cancel_stops_only_the_clients_own_query(start_proxy, pg, gate, threads) -> None:
    proxy = start_proxy(pool_size=2)
    with connect(proxy, "agent-a") as a, connect(proxy, "agent-b") as b:
        a_run = threads.submit(lambda: a.execute("SELECT pg_sleep(30)").fetchone())
        b_run = threads.submit(lambda: b.execute(gate.sql("b finished")).fetchone())
        wait_until(lambda: len(sleeping(pg, "30")) == 1 and len(gate.waiting()) == 1, WAIT,
                   "both clients running, each on its own server connection")  # fmt: skip
        (a_pid,), (b_pid,) = sleeping(pg, "30"), gate.waiting()
        assert a_pid != b_pid
        a.cancel_safe(timeout=5)
        with pytest.raises(errors.QueryCanceled):
            a_run.result(timeout=WAIT)
        assert sleeping(pg, "30") == []
        assert gate.waiting() == [b_pid]  # b was running all along, and still is
        gate.open()
        assert b_run.result(timeout=WAIT) == ("b finished",)  # not cancelled
        assert a.execute("SELECT 'a again'").fetchone() == ("a again",)
    assert proxy.alive()


async def test_asyncpg_timeout_cancels_only_its_own_query(start_proxy, pg, gate) -> None:
    proxy = start_proxy(pool_size=2)
    a = await asyncpg.connect(proxy.dsn("agent-a"), timeout=10)
    b = await asyncpg.connect(proxy.dsn("agent-b"), timeout=10)
    b_run = asyncio.create_task(b.fetchval(gate.sql("b finished")))
    try:
        await eventually(lambda: len(gate.waiting()) == 1, WAIT, "b running")
        (b_pid,) = gate.waiting()
        with pytest.raises(asyncio.TimeoutError):
            await a.fetchval("SELECT pg_sleep(30)", timeout=0.5)
        await eventually(lambda: sleeping(pg, "30") == [], WAIT, "a's query to be cancelled")
        assert gate.waiting() == [b_pid]
        gate.open()
        assert await asyncio.wait_for(b_run, WAIT) == "b finished"
        assert await asyncio.wait_for(a.fetchval("SELECT 40 + $1::int", 2), WAIT) == 42
        assert await asyncio.wait_for(b.fetchval("SELECT 'b again'"), WAIT) == "b again"
    finally:
        gate.open()
        if not b_run.done():
            b_run.cancel()
        # retrieve the outcome, so nothing is left to be reported when it is collected
        await asyncio.gather(b_run, return_exceptions=True)
        for conn in (a, b):
            try:
                await asyncio.wait_for(conn.close(), 5)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
                conn.terminate()  # a failed test may leave a query in flight


async def test_cancel_from_a_client_without_a_server_touches_nobody(
    start_proxy, pg, gate, threads
) -> None:
    # pool_size 1: the idle client's last server now runs the holder's query.
    proxy = start_proxy(pool_size=1)
    with connect(proxy, "holder") as holder, connect(proxy, "idle") as idle:
        idle_pid = idle.execute("SELECT pg_backend_pid()").fetchone()[0]
        run = threads.submit(lambda: holder.execute(gate.sql("holder finished")).fetchone())
        await eventually(lambda: len(gate.waiting()) == 1, WAIT, "the holder running")
        assert gate.waiting() == [idle_pid]  # the very server the idle client had before
        idle.cancel_safe(timeout=5)
        async with await WireClient.connect(proxy.port) as raw:  # a key nobody has
            await raw.send(codec.build_cancel(12345, 54321))
            assert await raw.read_until_eof(WAIT) == []
        await asyncio.sleep(0.3)  # a wrongly routed cancel would land by now
        assert gate.waiting() == [idle_pid]
        gate.open()
        assert run.result(timeout=WAIT) == ("holder finished",)
        assert idle.execute("SELECT 'idle fine'").fetchone() == ("idle fine",)


# ---------------------------------------------------------------- session mode


def test_session_mode_keeps_one_server_per_client(start_proxy, threads) -> None:
    proxy = start_proxy(pool_mode="session", pool_size=2, pool_acquire_timeout=1)
    with connect(proxy, "one") as one, connect(proxy, "two") as two:
        pids = {"one": set(), "two": set()}
        for _ in range(5):
            for name, conn in (("one", one), ("two", two)):
                pids[name].add(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
        assert len(pids["one"]) == len(pids["two"]) == 1
        assert pids["one"] != pids["two"]
        # session state that transaction pooling could not keep
        one.execute("SELECT set_config('test.who', 'one', false)")
        two.execute("SELECT set_config('test.who', 'two', false)")
        one.execute("CREATE TEMP TABLE mine AS SELECT 'one' AS owner")
        assert one.execute("SELECT current_setting('test.who'), owner FROM mine").fetchone() == (
            "one",
            "one",
        )
        assert two.execute("SELECT current_setting('test.who')").fetchone() == ("two",)
        # both servers are held for whole sessions: a third client waits, then gets 53300
        with connect(proxy, "three") as three:
            attempt = threads.submit(lambda: three.execute("SELECT 1").fetchone())
            with pytest.raises(errors.TooManyConnections):
                attempt.result(timeout=WAIT)
            one.close()
            wait_until(lambda: _try_select(three), WAIT, "the third client to get a server")
        assert two.execute("SELECT pg_backend_pid()").fetchone()[0] in pids["two"]
    assert proxy.alive()


def _try_select(conn: psycopg.Connection) -> bool:
    try:
        return conn.execute("SELECT 'three ok'").fetchone() == ("three ok",)
    except errors.TooManyConnections:
        return False


# ---------------------------------------------------------------- servers that die


async def test_upstream_down_at_startup_errors_name_the_cause(start_proxy) -> None:
    dead = free_port()
    proxy = start_proxy(upstream=f"postgresql://app_owner:app_pw@127.0.0.1:{dead}/app")
    ports = []
    for _ in range(2):  # the same answer every time, no hang, no crash
        async with await WireClient.connect(proxy.port) as raw:
            await raw.send(startup_packet({"user": "agent-1", "database": "app"}))
            fatal = fatal_in(await raw.read_until_eof(WAIT))
            ports.append(raw.local_port)
        assert fatal["C"].startswith("08"), fatal
        assert f"127.0.0.1:{dead}" in fatal["M"], fatal
        assert "refused" in fatal["M"].lower(), fatal
    with pytest.raises(psycopg.OperationalError, match="cannot connect to upstream"):
        connect(proxy, "agent-2")
    assert proxy.alive()
    for port in ports:
        assert len(log_lines_about(proxy.log(), port)) == 1


def test_pg_terminate_backend_of_idle_and_busy_servers(start_proxy, pg, table, threads) -> None:
    proxy = start_proxy(pool_size=2)
    with connect(proxy, "agent-1") as conn:
        # idle pooled server: its death is invisible to the client
        idle_pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert pg.psql(f"SELECT pg_terminate_backend({idle_pid})") == "t"
        wait_until(lambda: not backend_exists(pg, idle_pid), WAIT, "the idle backend to exit")
        pid, value = conn.execute("SELECT pg_backend_pid(), 'after idle kill'").fetchone()
        assert (pid != idle_pid, value) == (True, "after idle kill")

        # busy server: the client gets a clear error, then carries on
        run = threads.submit(lambda: conn.execute("SELECT pg_sleep(30)").fetchone())
        wait_until(lambda: len(sleeping(pg, "30")) == 1, WAIT, "the query to run")
        (busy_pid,) = sleeping(pg, "30")
        assert pg.psql(f"SELECT pg_terminate_backend({busy_pid})") == "t"
        with pytest.raises(psycopg.Error) as info:
            run.result(timeout=WAIT)
        assert info.value.sqlstate == "57P01"
        assert "terminating connection" in str(info.value)
        pid, value = conn.execute("SELECT pg_backend_pid(), 'after busy kill'").fetchone()
        assert (pid not in (idle_pid, busy_pid), value) == (True, "after busy kill")

    # idle in transaction: the next statement must fail, not run outside that transaction
    with connect(proxy, "agent-2", autocommit=False) as tx:
        tx.execute(f"INSERT INTO {table} VALUES (1, 'in the killed transaction')")
        tx_pid = tx.execute("SELECT pg_backend_pid()").fetchone()[0]
        pg.psql(f"SELECT pg_terminate_backend({tx_pid})")
        wait_until(lambda: not backend_exists(pg, tx_pid), WAIT, "the backend to exit")
        with pytest.raises(psycopg.Error) as info:
            tx.execute(f"INSERT INTO {table} VALUES (2, 'after the kill')")
        assert info.value.sqlstate in ("57P01", "08006"), info.value.sqlstate
        tx.rollback()
        assert int(pg.psql(f"SELECT count(*) FROM {table}")) == 0
        assert tx.execute("SELECT 'tx conn fine'").fetchone() == ("tx conn fine",)
        tx.commit()
    assert proxy.alive()


# ---------------------------------------------------------------- upstream restart (LAST)


def test_upstream_restart_in_the_middle_recovers_without_proxy_restart(
    start_proxy, pg, threads
) -> None:
    proxy = start_proxy(pool_size=2)

    def serves(conn: psycopg.Connection, marker: str) -> bool:
        try:
            return conn.execute("SELECT %s::text", (marker,)).fetchone() == (marker,)
        except psycopg.OperationalError:
            return False

    with connect(proxy, "idle-agent") as idle, connect(proxy, "busy-agent") as busy:
        assert idle.execute("SELECT 'before'").fetchone() == ("before",)
        run = threads.submit(lambda: busy.execute("SELECT pg_sleep(30)").fetchone())
        wait_until(lambda: len(sleeping(pg, "30")) == 1, WAIT, "the busy query to run")
        stopped = False
        try:
            pg.stop()
            stopped = True
            with pytest.raises(psycopg.Error) as busy_err:
                run.result(timeout=WAIT)
            assert busy_err.value.sqlstate in ("57P01", "08006"), busy_err.value
            assert "terminating connection" in str(busy_err.value) or "lost" in str(busy_err.value)
            with pytest.raises(psycopg.OperationalError) as idle_err:
                idle.execute("SELECT 'while down'")
            assert (idle_err.value.sqlstate or "").startswith("08"), idle_err.value
            assert "upstream" in str(idle_err.value)
            assert proxy.alive()
        finally:
            if stopped:
                pg.start()

        wait_until(lambda: serves(idle, "idle back"), 30, "the proxy to serve again")
        assert serves(busy, "busy back")
        with connect(proxy, "newcomer") as fresh:
            assert fresh.execute("SELECT current_user").fetchone() == ("app_owner",)
    assert proxy.alive()
