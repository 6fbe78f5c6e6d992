"""Faults: what breaks around the proxy, and what the proxy must keep true meanwhile.

Every test runs a real guardproxy (example policies, changed per test where the
fault needs it: pool of one server, short timeouts, ``audit.on_loss``) in front of
the session's real Postgres, and checks the effect: rows in the tables and in the
idempotency ledger, backends in pg_stat_activity, what each client saw on the wire,
that the proxy process is the same one and still alive, and that its log shows no
unhandled exception. Every wait is bounded.

* Postgres restarted in the middle of load: clear errors (08xxx / 57Pxx), the pool
  heals by itself, no proxy restart, every acknowledged write kept exactly once.
* pg_terminate_backend of an idle pooled server (invisible) and of a busy one (a
  clear error; a keyed write retried after it runs exactly once).
* a client killed mid-transaction and mid-COPY: rolled back, and on a pool of one
  server the next client gets a clean one.
* the proxy killed between a write's COMMIT and its reply, and SIGKILLed under write
  load: after a restart the agents' retries with the same keys give exactly one row.
* slow and half-open clients: idle_in_transaction timeout, client_idle_timeout and
  transaction_timeout free the server for the next client (pool of one); a client
  waiting for its answer is not idle.
* the audit queue full (lost events counted) and the audit store unreachable with
  ``audit: {on_loss: fail_closed}`` (writes refused meanwhile, accepted after).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import shop
from pgcluster import PgCluster, free_port
from proofkit import (
    AgentConn,
    Outcomes,
    assert_ledger_matches,
    audit_fail_closed,
    keyed_insert,
    launch,
    ledger_vs_rows,
    metric,
    policies_with,
    require_idempotency,
    rss_kb,
    superuser,
)
from wirekit import WireClient, errors_in

from guardproxy.protocol import codec

pytestmark = pytest.mark.timeout(120)

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline
clean_shop = shop.clean_shop

WAIT = 15.0
ONE_SERVER = {"limits": {"max_server_connections": 1}}


def new_key(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def rows_with_key(pg: PgCluster, key: str) -> int:
    return int(
        psql_shop(pg, f"SELECT count(*) FROM order_state_log WHERE idempotency_key = '{key}'")
    )


def ledger_has(pg: PgCluster, key: str) -> int:
    """Ledger entries of ``key`` (stored as is, or under the proxy's namespace ``...:key``)."""
    return int(
        psql_shop(
            pg,
            "SELECT count(*) FROM guardproxy.idempotency_keys "
            f"WHERE key = '{key}' OR key LIKE '%:{key}'",
        )
    )


def psql_shop(pg: PgCluster, sql: str) -> str:
    return pg.psql(sql, dbname=shop.SHOP_DB)


def backend_alive(pg: PgCluster, pid: int) -> bool:
    return psql_shop(pg, f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") == "1"


def leftover_transactions(pg: PgCluster) -> str:
    """Backends of the shop database left inside a transaction or a COPY."""
    return psql_shop(
        pg,
        "SELECT coalesce(string_agg(pid || ' ' || state || ' ' || left(query, 50), '; '), '') "
        "FROM pg_stat_activity WHERE datname = 'shop' AND pid <> pg_backend_pid() "
        "AND backend_type = 'client backend' "
        "AND (state LIKE 'idle in transaction%' OR query ILIKE 'copy%' AND state = 'active')",
    )


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Polls ``predicate`` (blocking calls allowed: run in a thread); returns seconds taken."""
    started = time.monotonic()
    while not await asyncio.to_thread(predicate):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


RAW_CLIENTS: list[WireClient] = []


@pytest.fixture(autouse=True)
async def _close_raw_clients() -> AsyncIterator[None]:
    """Raw clients a test left open (it failed half way, or the proxy cut them) are closed."""
    yield
    while RAW_CLIENTS:
        await RAW_CLIENTS.pop().close()


async def raw_agent(port: int, agent: str) -> WireClient:
    client = await WireClient.connect(port)
    RAW_CLIENTS.append(client)
    await client.login(user=agent, database=shop.SHOP_DB)
    return client


async def raw_ok(client: WireClient, sql: str) -> list[Any]:
    msgs = await client.query(sql)
    assert not errors_in(msgs), f"{sql}: {errors_in(msgs)}"
    return msgs


def unkeyed_insert(key: str, agent: str) -> str:
    """A support write without an idempotency tag: relayed as is, inside the client's transaction."""
    return (
        "INSERT INTO order_state_log (order_id, new_status, changed_by, reason, idempotency_key) "
        f"VALUES (1, 'packed', '{agent}', 'fault test', '{key}')"
    )


# ---------------------------------------------------------------- agents under faults


class Agents:
    """Support writers (keyed writes) and analytics readers that keep working through a
    fault: they reconnect when their connection breaks and retry unacknowledged writes
    with the same key until acknowledged, as an agent that follows the contract does."""

    def __init__(self, port: Callable[[], int], prefix: str) -> None:
        self.port = port
        self.prefix = prefix
        self.out = Outcomes()
        self.stopping = False
        self.reconnects = 0
        self.successes: dict[str, list[float]] = {}  # agent -> times of acknowledged answers
        self.error_messages: list[str] = []

    def dsn(self, agent: str) -> str:
        return f"postgresql://{agent}@127.0.0.1:{self.port()}/{shop.SHOP_DB}"

    async def connect(self, agent: str) -> AgentConn | None:
        try:
            return await AgentConn.open(self.dsn(agent), agent)
        except psycopg.Error:
            self.reconnects += 1
            return None

    def noted(self, agent: str) -> None:
        self.successes.setdefault(agent, []).append(time.monotonic())

    async def writer(self, agent: str, seed: int, give_up_at: Callable[[], float]) -> None:
        rng = random.Random(seed)
        conn: AgentConn | None = None
        backlog: list[tuple[str, str]] = []
        while time.monotonic() < give_up_at():
            if self.stopping and not backlog:
                break
            if conn is None or not conn.usable:
                if conn is not None:
                    await conn.close()
                conn = await self.connect(agent)
                if conn is None:
                    await asyncio.sleep(0.2)
                    continue
            if backlog:
                key, sql = backlog[0]
            else:
                key = f"{self.prefix}{uuid.uuid4().hex[:12]}"
                sql = keyed_insert(key, agent, rng.randint(1, 6), "fault")
                backlog.append((key, sql))
            code = await self.out.write(conn, key, sql)
            if code is None:
                backlog.pop(0)
                self.noted(agent)
                await asyncio.sleep(rng.uniform(0.01, 0.1))
            else:
                self.error_messages.append(self.out.last_message)
                await asyncio.sleep(0.15)
        if conn is not None:
            await conn.close()

    async def reader(self, agent: str, seed: int, give_up_at: Callable[[], float]) -> None:
        rng = random.Random(seed)
        conn: AgentConn | None = None
        while time.monotonic() < give_up_at() and not self.stopping:
            if conn is None or not conn.usable:
                if conn is not None:
                    await conn.close()
                conn = await self.connect(agent)
                if conn is None:
                    await asyncio.sleep(0.2)
                    continue
            order = rng.randint(1, 6)
            self.out.statements += 1
            self.out.reads += 1
            try:
                _, rows = await conn.run(f"SELECT id FROM orders WHERE id = {order}")
            except psycopg.Error as exc:
                self.out.error(exc)
                self.error_messages.append(self.out.last_message)
                await asyncio.sleep(0.15)
                continue
            if rows != [(order,)]:
                self.out.wrong_answers.append(f"order {order}: {rows}")
            self.noted(agent)
            await asyncio.sleep(rng.uniform(0.01, 0.1))
        if conn is not None:
            await conn.close()


def fault_errors_only(out: Outcomes, extra: frozenset[str] = frozenset()) -> None:
    """Errors of a lost server or an unreachable upstream (08xxx, 57Pxx), or fail-fast 53300."""
    unexpected = {
        code: n
        for code, n in out.errors.items()
        if not (code.startswith(("08", "57P")) or code == "53300" or code in extra)
    }
    assert not unexpected, f"unexpected errors {unexpected}: {out.samples}"


# ---------------------------------------------------------------- Postgres restarted


def ensure_started(pg: PgCluster) -> None:
    """Starts Postgres again; a server that is already up (stop failed half way) is fine."""
    try:
        pg.start()
    except RuntimeError:
        if pg.psql("SELECT 1", dbname=shop.SHOP_DB) != "1":
            raise


@pytest.mark.slow
async def test_postgres_restart_under_load_gives_clear_errors_and_the_pool_heals_without_proxy_restart(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    pg = clean_shop
    policies = policies_with(
        tmp_path, support={"limits": {"max_server_connections": 4, "max_client_sessions": 200}}
    )
    require_idempotency(policies)
    with launch(
        pg,
        tmp_path / "guardproxy.log",
        policies,
        pool_size=1,
        pool_acquire_timeout=3,
        server_connect_timeout=2,
    ) as proxy:
        pid = proxy.proc.pid
        agents = Agents(lambda: proxy.port, f"restart-{uuid.uuid4().hex[:6]}-")
        end = time.monotonic() + 60
        tasks = [agents.writer(f"support-{i}", i, lambda: end) for i in range(30)]
        tasks += [agents.reader(f"analytics-{i}", 100 + i, lambda: end) for i in range(10)]
        running = asyncio.gather(*tasks)
        try:
            await asyncio.sleep(2.0)
            before = agents.out.executed
            assert before > 0, f"no write went through before the restart: {agents.out.summary()}"
            try:
                await asyncio.to_thread(pg.stop)
                await asyncio.sleep(2.0)  # clients keep trying while Postgres is down
                errors_while_down = sum(agents.out.errors.values())
                assert proxy.proc.poll() is None, "guardproxy died when Postgres stopped"
            finally:
                await asyncio.to_thread(ensure_started, pg)
            restarted = time.monotonic()
            # the pool heals: every agent gets an answer again, with the same proxy process
            everyone = [f"support-{i}" for i in range(30)] + [f"analytics-{i}" for i in range(10)]

            def healed() -> bool:
                return all(
                    any(t > restarted for t in agents.successes.get(a, ())) for a in everyone
                )

            def unserved() -> str:
                missing = [
                    a
                    for a in everyone
                    if not any(t > restarted for t in agents.successes.get(a, ()))
                ]
                return (
                    f"every agent to be served again (not yet: {missing}; {agents.out.summary()})"
                )

            try:
                heal_seconds = await wait_until(healed, 30, "every agent to be served again")
            except AssertionError:
                raise AssertionError(unserved()) from None
            await asyncio.sleep(1.0)
        finally:
            agents.stopping = True
            end = time.monotonic() + 20  # retries of unacknowledged writes may finish
            await asyncio.wait_for(running, 40)
        assert proxy.proc.poll() is None and proxy.proc.pid == pid
        out = agents.out
        print(
            f"\nRESTART FIGURES: {out.summary()}; errors while Postgres was down "
            f"{errors_while_down}; all 40 agents served again {heal_seconds:.1f}s after start; "
            f"reconnects {agents.reconnects}; first error of each kind {out.samples}"
        )
        assert errors_while_down > 0, "nobody noticed Postgres was down"
        fault_errors_only(out)
        assert all(agents.error_messages), "an error reached a client without a message"
        assert not out.wrong_answers, out.wrong_answers[:5]
        assert not out.unacked, f"writes never acknowledged: {list(out.unacked)[:5]}"
        keys, rows = assert_ledger_matches(pg, agents.prefix, out)
        assert keys == rows == len(out.acked)


# ---------------------------------------------------------------- backends terminated


async def test_terminated_idle_server_is_invisible_and_a_busy_one_gives_a_clear_error(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    pg = clean_shop
    policies = policies_with(tmp_path, support=ONE_SERVER)
    require_idempotency(policies)
    with launch(pg, tmp_path / "guardproxy.log", policies, pool_size=1) as proxy:
        agent = await AgentConn.open(proxy.dsn(shop.SUPPORT), shop.SUPPORT)
        try:
            # idle pooled server: killed between two statements, the client never knows
            _, [(idle_pid,)] = await agent.run("SELECT pg_backend_pid()")
            assert psql_shop(pg, f"SELECT pg_terminate_backend({idle_pid})") == "t"
            await wait_until(
                lambda: not backend_alive(pg, idle_pid), WAIT, "the idle backend to exit"
            )
            first = new_key("term-idle")
            tag, _ = await agent.run(keyed_insert(first, shop.SUPPORT, 1))
            assert (tag, agent.replayed) == ("INSERT 0 1", False)
            _, [(pid_after,)] = await agent.run("SELECT pg_backend_pid()")
            assert pid_after != idle_pid

            # busy server: a keyed write waiting on a lock, its backend terminated
            with superuser(pg, autocommit=False) as locker:
                locker.execute("LOCK TABLE order_state_log IN ACCESS EXCLUSIVE MODE")
                second = new_key("term-busy")
                write = asyncio.create_task(agent.run(keyed_insert(second, shop.SUPPORT, 2)))
                waiting = "SELECT pid FROM pg_stat_activity WHERE datname = 'shop' AND wait_event_type = 'Lock' AND query LIKE '%term-busy%'"
                await wait_until(lambda: psql_shop(pg, waiting) != "", WAIT, "the write to wait")
                busy_pid = int(psql_shop(pg, waiting).split()[0])
                assert psql_shop(pg, f"SELECT pg_terminate_backend({busy_pid})") == "t"
                with pytest.raises(psycopg.Error) as info:
                    await asyncio.wait_for(write, WAIT)
                locker.rollback()
            err = info.value
            assert err.sqlstate in ("57P01", "08006"), (err.sqlstate, str(err))
            assert "terminating connection" in str(err) or "lost" in str(err), str(err)
            assert rows_with_key(pg, second) == 0 and ledger_has(pg, second) == 0

            # the agent retries the same write with the same key: it runs now, once
            tag, _ = await agent.run(keyed_insert(second, shop.SUPPORT, 2))
            assert (tag, agent.replayed) == ("INSERT 0 1", False)
            tag, _ = await agent.run(keyed_insert(second, shop.SUPPORT, 2))
            assert (tag, agent.replayed) == ("INSERT 0 1", True)
            assert rows_with_key(pg, first) == rows_with_key(pg, second) == 1
            assert ledger_has(pg, first) == ledger_has(pg, second) == 1

            # a busy read terminated the same way; then reads work again on a new backend
            with superuser(pg, autocommit=False) as locker:
                locker.execute("LOCK TABLE order_state_log IN ACCESS EXCLUSIVE MODE")
                read = asyncio.create_task(
                    agent.run("SELECT count(*) FROM order_state_log WHERE order_id = 3")
                )
                waiting = "SELECT pid FROM pg_stat_activity WHERE datname = 'shop' AND wait_event_type = 'Lock' AND query LIKE '%order_id = 3%'"
                await wait_until(lambda: psql_shop(pg, waiting) != "", WAIT, "the read to wait")
                psql_shop(pg, f"SELECT pg_terminate_backend({psql_shop(pg, waiting).split()[0]})")
                with pytest.raises(psycopg.Error) as info:
                    await asyncio.wait_for(read, WAIT)
                locker.rollback()
            assert info.value.sqlstate in ("57P01", "08006"), str(info.value)
            _, rows = await agent.run(
                f"SELECT count(*) FROM order_state_log WHERE idempotency_key IN ('{first}', '{second}')"
            )
            assert rows == [(2,)]
        finally:
            await agent.close()
        assert proxy.proc.poll() is None
        assert leftover_transactions(pg) == ""


# ---------------------------------------------------------------- clients killed


async def test_client_killed_mid_transaction_is_rolled_back_and_the_next_client_gets_a_clean_server(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    pg = clean_shop
    policies = policies_with(tmp_path, support=ONE_SERVER)
    with launch(pg, tmp_path / "guardproxy.log", policies, pool_size=1) as proxy:
        key = new_key("killed-tx")
        victim = await raw_agent(proxy.port, "support-victim")
        await raw_ok(victim, "BEGIN")
        await raw_ok(victim, unkeyed_insert(key, "support-victim"))
        victim_pid = int(await victim.scalar("SELECT pg_backend_pid()") or 0)
        assert backend_alive(pg, victim_pid)
        await victim.abort()  # a TCP reset: the client process died

        started = time.monotonic()
        nxt = await AgentConn.open(proxy.dsn("support-next"), "support-next")
        try:
            _, [(pid, fresh, seen, xact_free)] = await asyncio.wait_for(
                nxt.run(
                    "SELECT pg_backend_pid(), now() = statement_timestamp(), "
                    f"(SELECT count(*) FROM order_state_log WHERE idempotency_key = '{key}'), "
                    "pg_current_xact_id_if_assigned() IS NULL"
                ),
                WAIT,
            )
        finally:
            await nxt.close()
        waited = time.monotonic() - started
        # a new backend, in a transaction of its own, that never saw the killed client's row
        assert pid != victim_pid
        assert (fresh, seen, xact_free) == (True, 0, True)
        assert waited < 5, f"the next client waited {waited:.1f}s for the only server"
        await wait_until(lambda: not backend_alive(pg, victim_pid), WAIT, "the dirty backend to go")
        assert rows_with_key(pg, key) == 0
        assert leftover_transactions(pg) == ""
        assert proxy.proc.poll() is None


async def test_client_killed_mid_copy_is_rolled_back_and_the_next_client_gets_a_clean_server(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    pg = clean_shop
    policies = policies_with(tmp_path, support=ONE_SERVER)
    with launch(pg, tmp_path / "guardproxy.log", policies, pool_size=1) as proxy:
        key = new_key("killed-copy")
        victim = await raw_agent(proxy.port, "support-victim")
        victim_pid = int(await victim.scalar("SELECT pg_backend_pid()") or 0)
        await victim.send(
            codec.build_query(
                "COPY order_state_log (order_id, new_status, changed_by, idempotency_key) FROM STDIN"
            )
        )
        msgs = await victim.read_until(b"GE")
        assert msgs[-1].kind == b"G", f"COPY did not start: {errors_in(msgs)}"
        copy_pid = int(
            psql_shop(
                pg,
                "SELECT pid FROM pg_stat_activity WHERE datname = 'shop' AND query LIKE '%COPY order_state_log%' AND pid <> pg_backend_pid()",
            )
        )
        for n in range(3):
            await victim.send(
                codec.message(b"d", f"1\tpacked\tsupport-victim\t{key}-{n}\n".encode())
            )
        await asyncio.sleep(0.2)
        await victim.abort()  # mid-COPY: no CopyDone ever comes

        nxt = await AgentConn.open(proxy.dsn("support-next"), "support-next")
        try:
            _, [(pid, seen, xact_free)] = await asyncio.wait_for(
                nxt.run(
                    "SELECT pg_backend_pid(), "
                    f"(SELECT count(*) FROM order_state_log WHERE idempotency_key LIKE '{key}%'), "
                    "pg_current_xact_id_if_assigned() IS NULL"
                ),
                WAIT,
            )
        finally:
            await nxt.close()
        assert pid not in (victim_pid, copy_pid)
        assert (seen, xact_free) == (0, True)
        await wait_until(lambda: not backend_alive(pg, copy_pid), WAIT, "the COPY backend to go")
        assert (
            int(
                psql_shop(
                    pg, f"SELECT count(*) FROM order_state_log WHERE idempotency_key LIKE '{key}%'"
                )
            )
            == 0
        )
        assert leftover_transactions(pg) == ""
        assert proxy.proc.poll() is None


# ---------------------------------------------------------------- the proxy killed


async def test_proxy_crash_between_commit_and_reply_then_the_retry_after_restart_is_replayed_once(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    pg = clean_shop
    policies = policies_with(tmp_path)
    require_idempotency(policies)
    key = new_key("crash")
    sql = keyed_insert(key, shop.SUPPORT, 4)
    with launch(
        pg,
        tmp_path / "crashing.log",
        policies,
        env={"GUARDPROXY_TEST_CRASH_AFTER_COMMIT": "1"},
    ) as crashing:
        agent = await AgentConn.open(crashing.dsn(shop.SUPPORT), shop.SUPPORT)
        with pytest.raises(psycopg.OperationalError):
            await asyncio.wait_for(agent.run(sql), WAIT)  # no reply: the proxy is gone
        await agent.close()
        code = await asyncio.to_thread(crashing.proc.wait, WAIT)
        assert code == 99, f"the proxy should have died by the crash hook, exit code {code}"
    # committed before the crash: the row and its ledger entry, together
    assert (rows_with_key(pg, key), ledger_has(pg, key)) == (1, 1)

    with launch(pg, tmp_path / "restarted.log", policies) as restarted:
        agent = await AgentConn.open(restarted.dsn(shop.SUPPORT), shop.SUPPORT)
        try:
            tag, _ = await agent.run(sql)  # the agent's retry: same statement, same key
            assert tag == "INSERT 0 1", tag
            assert agent.replayed, f"the retry was not answered from the ledger: {agent.notices}"
            # the same key for another statement: refused, nothing runs
            with pytest.raises(psycopg.Error) as info:
                await agent.run(keyed_insert(key, shop.SUPPORT, 5))
            assert info.value.sqlstate == "22023", str(info.value)
        finally:
            await agent.close()
    assert (rows_with_key(pg, key), ledger_has(pg, key)) == (1, 1)


async def test_a_retry_sent_as_a_prepared_statement_is_replayed_like_the_first_attempt(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    """Client libraries change protocol on their own: psycopg prepares a statement it has
    run five times, asyncpg prepares every one. A retry is the same write whether it comes
    as a simple Query or as Parse/Bind/Execute (no parameters either way)."""
    pg = clean_shop
    policies = policies_with(tmp_path)
    require_idempotency(policies)
    with launch(pg, tmp_path / "guardproxy.log", policies) as proxy:
        agent = await AgentConn.open(proxy.dsn(shop.SUPPORT), shop.SUPPORT)
        agent.conn.prepare_threshold = 5  # psycopg's default: prepare=True works again
        try:
            for first, retry in (("simple", "prepared"), ("prepared", "simple")):
                key = new_key(f"{first}-then-{retry}")
                sql = keyed_insert(key, shop.SUPPORT, 2)
                for attempt, protocol in enumerate((first, retry)):
                    agent.notices.clear()
                    try:
                        cur = await agent.conn.execute(sql, prepare=protocol == "prepared")
                    except psycopg.Error as exc:
                        raise AssertionError(
                            f"{protocol} retry of a {first} write with the same key and text "
                            f"was refused: {exc.sqlstate} {exc}"
                        ) from None
                    assert cur.statusmessage == "INSERT 0 1"
                    assert agent.replayed == (attempt == 1), (protocol, agent.notices)
                assert (rows_with_key(pg, key), ledger_has(pg, key)) == (1, 1)
        finally:
            await agent.close()


@pytest.mark.slow
async def test_proxy_sigkilled_under_write_load_then_retries_give_exactly_one_row_per_key(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    pg = clean_shop
    policies = policies_with(tmp_path)
    require_idempotency(policies)
    port: dict[str, int] = {}
    agents = Agents(lambda: port["now"], f"sigkill-{uuid.uuid4().hex[:6]}-")
    end = time.monotonic() + 60
    tasks: asyncio.Future[Any] | None = None
    try:
        with launch(pg, tmp_path / "first.log", policies) as first:
            port["now"] = first.port
            tasks = asyncio.gather(
                *(agents.writer(f"support-{i}", i, lambda: end) for i in range(20))
            )
            await asyncio.sleep(2.0)
            acked_before = len(agents.out.acked)
            first.proc.send_signal(signal.SIGKILL)
            assert await asyncio.to_thread(first.proc.wait, WAIT) == -signal.SIGKILL
            killed_at = time.monotonic()
            await asyncio.sleep(0.5)  # the agents notice
        in_flight = set(agents.out.unacked)  # sent, no answer: run or not, nobody knows
        with launch(pg, tmp_path / "second.log", policies) as second:
            port["now"] = second.port
            await wait_until(
                lambda: all(
                    any(t > killed_at for t in agents.successes.get(f"support-{i}", ()))
                    for i in range(20)
                ),
                30,
                "every agent to write through the restarted proxy",
            )
            await asyncio.sleep(1.0)
            agents.stopping = True
            end = time.monotonic() + 20
            await asyncio.wait_for(tasks, 40)
            assert second.proc.poll() is None
    finally:
        agents.stopping = True
        if tasks is not None and not tasks.done():
            tasks.cancel()
            with contextlib.suppress(BaseException):
                await tasks
    out = agents.out
    replayed_in_flight = [k for k in in_flight if k in out.acked and k not in out.executions]
    print(
        f"\nSIGKILL FIGURES: {out.summary()}; acknowledged before the kill {acked_before}; "
        f"in flight at the kill {len(in_flight)}, of which committed before the kill and "
        f"answered by replay after it {len(replayed_in_flight)}"
    )
    assert acked_before > 0
    assert not out.unacked, f"writes never acknowledged: {list(out.unacked)[:5]}"
    fault_errors_only(out)
    keys, rows = assert_ledger_matches(pg, agents.prefix, out)
    assert keys == rows == len(out.acked)


# ---------------------------------------------------------------- slow and half-open clients


async def test_silent_client_in_a_transaction_is_cut_by_idle_in_transaction_timeout_and_its_server_freed(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    pg = clean_shop
    policies = policies_with(
        tmp_path,
        support={
            "limits": {"max_server_connections": 1},
            "timeouts": {"idle_in_transaction_timeout": "1s"},
        },
    )
    with launch(pg, tmp_path / "guardproxy.log", policies, pool_size=1) as proxy:
        key = new_key("silent-tx")
        silent = await raw_agent(proxy.port, "support-silent")
        await raw_ok(silent, "BEGIN")
        await raw_ok(silent, unkeyed_insert(key, "support-silent"))
        silent_pid = int(await silent.scalar("SELECT pg_backend_pid()") or 0)
        # ... and says nothing more. Another agent needs the only server.
        other = await AgentConn.open(proxy.dsn("support-other"), "support-other")
        started = time.monotonic()
        try:
            _, rows = await asyncio.wait_for(
                other.run(f"SELECT count(*) FROM order_state_log WHERE idempotency_key = '{key}'"),
                WAIT,
            )
        finally:
            await other.close()
        waited = time.monotonic() - started
        assert rows == [(0,)]
        assert waited < 6, f"the other client waited {waited:.1f}s (timeout 1s)"
        assert not backend_alive(pg, silent_pid)
        # the silent client learns why on its next request, and its session goes on
        msgs = await silent.query("SELECT 1")
        errs = errors_in(msgs)
        assert errs and errs[0]["C"] == "25P03", msgs
        assert "idle-in-transaction" in errs[0]["M"], errs
        assert await silent.scalar("SELECT 'still usable'") == "still usable"
        await silent.close()
        assert rows_with_key(pg, key) == 0
        assert proxy.proc.poll() is None


async def test_half_open_client_is_cut_by_client_idle_timeout_and_its_server_freed(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    pg = clean_shop
    policies = policies_with(tmp_path, support=ONE_SERVER)  # idle in transaction: 30s
    with launch(
        pg, tmp_path / "guardproxy.log", policies, pool_size=1, client_idle_timeout=1.5
    ) as proxy:
        key = new_key("half-open")
        silent = await raw_agent(proxy.port, "support-silent")
        await raw_ok(silent, "BEGIN")
        await raw_ok(silent, unkeyed_insert(key, "support-silent"))
        silent_pid = int(await silent.scalar("SELECT pg_backend_pid()") or 0)
        await silent.send(b"Q\x00\x00")  # the start of a message, then nothing: half open
        # the other client comes 1s later, so that it waits less than client_idle_timeout itself
        await asyncio.sleep(1.0)
        other = await AgentConn.open(proxy.dsn("support-other"), "support-other")
        started = time.monotonic()
        try:
            _, rows = await asyncio.wait_for(
                other.run(f"SELECT count(*) FROM order_state_log WHERE idempotency_key = '{key}'"),
                WAIT,
            )
        finally:
            await other.close()
        waited = time.monotonic() - started
        assert rows == [(0,)]
        assert waited < 6, f"the other client waited {waited:.1f}s (client_idle_timeout 1.5s)"
        msgs = await silent.read_until_eof(WAIT)
        fatal = [e for e in errors_in(msgs) if e.get("S") == "FATAL"]
        assert fatal and "client_idle_timeout" in fatal[0]["M"], msgs
        await wait_until(lambda: not backend_alive(pg, silent_pid), WAIT, "its backend to go")
        assert rows_with_key(pg, key) == 0
        assert proxy.proc.poll() is None


async def test_client_idle_timeout_spares_a_client_waiting_for_its_answer(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    """A client whose statement runs longer than client_idle_timeout sent nothing meanwhile,
    but it is not idle: it waits for the proxy. Cutting it would kill every long query."""
    pg = clean_shop
    policies = policies_with(tmp_path)
    with launch(pg, tmp_path / "guardproxy.log", policies, client_idle_timeout=1.5) as proxy:
        agent = await AgentConn.open(proxy.dsn(shop.SUPPORT), shop.SUPPORT)
        try:
            with superuser(pg, autocommit=False) as locker:
                locker.execute("LOCK TABLE order_state_log IN ACCESS EXCLUSIVE MODE")
                read = asyncio.create_task(
                    agent.run("SELECT count(*) FROM order_state_log WHERE order_id = 6")
                )
                await asyncio.sleep(3.0)  # twice client_idle_timeout
                locker.rollback()
            try:
                _, rows = await asyncio.wait_for(read, WAIT)
            except psycopg.Error as exc:
                raise AssertionError(
                    f"a client waiting 3s for its answer was cut as idle: {exc}"
                ) from None
            assert rows == [(1,)]
        finally:
            await agent.close()


async def test_client_that_stops_reading_is_cut_by_transaction_timeout_and_its_server_freed(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    pg = clean_shop
    policies = policies_with(
        tmp_path,
        support={
            "limits": {"max_server_connections": 1},
            "timeouts": {"transaction_timeout": "2s"},
        },
    )
    with launch(pg, tmp_path / "guardproxy.log", policies, pool_size=1) as proxy:
        slow = await raw_agent(proxy.port, "support-slow")
        slow_pid = int(await slow.scalar("SELECT pg_backend_pid()") or 0)
        rss_before = rss_kb(proxy.proc.pid)
        # 64 MB of result, and the client never reads a byte of it
        await slow.send(
            codec.build_query("SELECT repeat('x', 1000000) FROM generate_series(1, 64) g")
        )
        await asyncio.sleep(0.5)
        other = await AgentConn.open(proxy.dsn("support-other"), "support-other")
        started = time.monotonic()
        try:
            _, rows = await asyncio.wait_for(other.run("SELECT id FROM orders WHERE id = 1"), WAIT)
        finally:
            await other.close()
        waited = time.monotonic() - started
        assert rows == [(1,)]
        assert waited < 8, f"the other client waited {waited:.1f}s (transaction_timeout 2s)"
        await wait_until(
            lambda: not backend_alive(pg, slow_pid), WAIT, "the slow reader's backend to go"
        )
        grown = rss_kb(proxy.proc.pid) - rss_before
        assert grown < 32 * 1024, f"the proxy buffered {grown} kB of the unread result"
        await slow.abort()
        assert proxy.proc.poll() is None


# ---------------------------------------------------------------- the audit queue and store


def audit_events_for(pg: PgCluster, prefix: str) -> dict[str, int]:
    with superuser(pg) as conn:
        return {
            d: int(n)
            for d, n in conn.execute(
                "SELECT decision, count(*) FROM guardproxy.audit_events WHERE statement LIKE %s "
                "GROUP BY 1",
                (f"%{prefix}%",),
            )
        }


async def burst(proxy: Any, prefix: str, clients: int, each: int) -> Outcomes:
    """``clients`` support agents each send ``each`` keyed writes at once."""
    out = Outcomes()
    conns = [
        await AgentConn.open(proxy.dsn(f"support-b{i}"), f"support-b{i}") for i in range(clients)
    ]

    async def one(conn: AgentConn) -> None:
        for _ in range(each):
            key = f"{prefix}{uuid.uuid4().hex[:12]}"
            await out.write(conn, key, keyed_insert(key, conn.agent, 3, "burst"))

    try:
        await asyncio.wait_for(asyncio.gather(*(one(c) for c in conns)), 60)
    finally:
        for conn in conns:
            await conn.close()
    return out


async def test_full_audit_queue_counts_the_lost_events_and_writes_go_on_with_on_loss_count(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    pg = clean_shop
    policies = policies_with(tmp_path, support={"audit": {"on_loss": "count"}})
    require_idempotency(policies)
    metrics_port = free_port()
    prefix = f"fullq-{uuid.uuid4().hex[:6]}-"
    with launch(
        pg,
        tmp_path / "guardproxy.log",
        policies,
        audit_queue_size=1,
        metrics_port=metrics_port,
    ) as proxy:
        assert metric(metrics_port, "guardproxy_audit_events_lost") == 0
        out = await burst(proxy, prefix, clients=30, each=5)
        lost = metric(metrics_port, "guardproxy_audit_events_lost")
        assert not out.errors, f"with on_loss: count no write may be refused: {out.samples}"
        assert lost > 0, "a burst of 150 writes through a queue of 1 lost nothing?"
        keys, rows = assert_ledger_matches(pg, prefix, out)
        assert keys == rows == 150
        # every event is either stored or counted as lost, none vanishes silently
        await asyncio.sleep(1.0)
        stored = sum(audit_events_for(pg, prefix).values())
        print(f"\nAUDIT QUEUE FIGURES: 150 writes, {stored} events stored, {lost:.0f} counted lost")
        assert stored + lost == 150, (stored, lost)
        assert proxy.proc.poll() is None


async def test_fail_closed_refuses_writes_while_the_audit_store_is_unreachable_and_resumes_after(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    pg = clean_shop
    policies = policies_with(tmp_path, support={"audit": {"on_loss": "fail_closed"}})
    require_idempotency(policies)
    assert audit_fail_closed(policies)
    prefix = f"failclosed-{uuid.uuid4().hex[:6]}-"
    with launch(pg, tmp_path / "guardproxy.log", policies) as proxy:
        agent = await AgentConn.open(proxy.dsn(shop.SUPPORT), shop.SUPPORT)
        out = Outcomes()
        moved = False
        try:
            assert (
                await out.write(
                    agent, prefix + "before", keyed_insert(prefix + "before", shop.SUPPORT, 1)
                )
                is None
            )
            psql_shop(pg, "ALTER TABLE guardproxy.audit_events RENAME TO audit_events_away")
            moved = True
            # the store fails the next batch; from then on writes are refused
            during = 0
            refused: list[str] = []
            deadline = time.monotonic() + WAIT
            while len(refused) < 5 and time.monotonic() < deadline:
                during += 1
                key = f"{prefix}down-{during}"
                code = await out.write(agent, key, keyed_insert(key, shop.SUPPORT, 1))
                if code is not None:
                    assert code == "53400", out.samples
                    refused.append(key)
                await asyncio.sleep(0.1)
            assert len(refused) == 5, (
                f"writes were not refused while the audit store was gone: {out.summary()}"
            )
            message = out.samples["53400"]
            assert "audit" in message and "fail_closed" in message, message
            for key in refused:
                assert (rows_with_key(pg, key), ledger_has(pg, key)) == (0, 0)
            _, rows = await agent.run("SELECT id FROM orders WHERE id = 1")  # reads go on
            assert rows == [(1,)]
        finally:
            if moved:
                psql_shop(pg, "ALTER TABLE guardproxy.audit_events_away RENAME TO audit_events")
        try:
            key = prefix + "after"
            deadline = time.monotonic() + WAIT
            while (
                code := await out.write(agent, key, keyed_insert(key, shop.SUPPORT, 1))
            ) is not None:
                assert code == "53400" and time.monotonic() < deadline, out.samples
                await asyncio.sleep(0.3)
        finally:
            await agent.close()
        assert rows_with_key(pg, key) == 1
        acked_while_down = sorted(k for k in out.acked if "-down-" in k)
        print(
            f"\nFAIL-CLOSED FIGURES: {len(refused)} writes refused while the audit store was gone; "
            f"acknowledged before the proxy noticed: {len(acked_while_down)}"
        )
        ledger, rows_by_key = ledger_vs_rows(pg, prefix)
        assert set(ledger) == set(rows_by_key) == set(out.acked)
        assert proxy.proc.poll() is None


async def test_fail_closed_never_acknowledges_a_write_whose_audit_event_was_dropped(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    """With on_loss: fail_closed and a full queue, a write is refused (53400) or it is
    acknowledged and recorded: an acknowledged write without its audit event is the loss
    fail_closed exists to prevent."""
    pg = clean_shop
    policies = policies_with(tmp_path, support={"audit": {"on_loss": "fail_closed"}})
    require_idempotency(policies)
    metrics_port = free_port()
    prefix = f"fcq-{uuid.uuid4().hex[:6]}-"
    with launch(
        pg,
        tmp_path / "guardproxy.log",
        policies,
        audit_queue_size=1,
        metrics_port=metrics_port,
    ) as proxy:
        out = await burst(proxy, prefix, clients=30, each=5)
        assert set(out.errors) <= {"53400"}, out.samples
        assert_ledger_matches(pg, prefix, out)
        for key in out.unacked:
            assert (rows_with_key(pg, key), ledger_has(pg, key)) == (0, 0)
        await asyncio.sleep(1.5)
        with superuser(pg) as conn:
            recorded = {
                key
                for key in out.acked
                if conn.execute(
                    "SELECT 1 FROM guardproxy.audit_events WHERE statement LIKE %s "
                    "AND decision = 'allowed'",
                    (f"%{key}%",),
                ).fetchone()
            }
        unrecorded = sorted(set(out.acked) - recorded)
        lost = metric(metrics_port, "guardproxy_audit_events_lost")
        print(
            f"\nFAIL-CLOSED QUEUE FIGURES: {len(out.acked)} writes acknowledged, "
            f"{len(out.unacked)} refused (53400), {len(unrecorded)} acknowledged without "
            f"an audit event, {lost:.0f} events counted lost"
        )
        assert not unrecorded, (
            f"{len(unrecorded)} of {len(out.acked)} acknowledged writes have no audit event "
            f"under on_loss: fail_closed (e.g. {unrecorded[:3]})"
        )
        assert proxy.proc.poll() is None
