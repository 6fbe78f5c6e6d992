"""Load: 1,000 client connections through one proxy over at most 20 server connections.

One guardproxy with the example policies (limits raised for 1,000 sessions, the
support and analytics pools capped at 15 + 3 servers, 1 for the proxy's own catalog
reads, 1 for the audit writer) in transaction mode. 800 support agents write rows to
order_state_log, every write with its own idempotency key; some retry a write they
already got an answer for (same statement, same key), 25 pairs send one write on two
connections at the same moment; they also read their own writes back. 200 analytics
agents read orders. Each client thinks between statements, for a bounded time.

Afterwards the ledger (guardproxy.idempotency_keys) and the table agree key by key:
every acknowledged write is there once, no key has two rows, every retry was answered
from the ledger, and the only errors allowed are the configured fail-fast ones (53300).
The figures are printed for docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import random
import resource
import time
import uuid
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
    keyed_insert,
    launch,
    metric,
    policies_with,
    require_idempotency,
    superuser,
)

pytestmark = pytest.mark.timeout(300)

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline
clean_shop = shop.clean_shop

SUPPORT_SOLO = 750
RACE_PAIRS = 25  # 50 more support connections
ANALYTICS_CLIENTS = 200
CLIENTS = SUPPORT_SOLO + 2 * RACE_PAIRS + ANALYTICS_CLIENTS
SUPPORT_SERVERS, ANALYTICS_SERVERS, OWN_SERVERS = 15, 3, 1
SERVER_BUDGET = 20  # the pools above plus the audit writer's connection
DURATION = 20.0
THINK = (0.4, 2.0)  # seconds between two statements of one client
ALLOWED_ERRORS = {"53300"}  # pool_acquire_timeout: the configured fail-fast answer


def raise_fd_limit(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert soft >= need, f"need {need} file descriptors, the hard limit is {hard}"
    return soft


class Run:
    def __init__(self, prefix: str, deadline: float, seed: int) -> None:
        self.prefix = prefix
        self.deadline = deadline
        self.out = Outcomes()
        self.rng = random.Random(seed)
        self.races = 0
        self.race_replays = 0
        self.peak_servers = 0

    def key(self) -> str:
        return f"{self.prefix}{uuid.uuid4().hex[:12]}"

    async def think(self, rng: random.Random) -> bool:
        await asyncio.sleep(rng.uniform(*THINK))
        return time.monotonic() < self.deadline

    async def support(self, agent: AgentConn, seed: int) -> None:
        rng = random.Random(seed)
        mine: list[tuple[str, str]] = []  # acknowledged (key, statement)
        retry: list[tuple[str, str]] = []  # not acknowledged yet: the agent retries them
        while await self.think(rng):
            roll = rng.random()
            if retry:
                key, sql = retry.pop()
            elif roll < 0.45 or not mine:
                key = self.key()
                sql = keyed_insert(key, agent.agent, rng.randint(1, 6), "bulk")
            elif roll < 0.60:
                key, sql = rng.choice(mine)  # a retry of a write that was answered
                if await self.out.write(agent, key, sql) is None and not agent.replayed:
                    self.out.wrong_answers.append(f"retry of {key} ran again")
                continue
            else:
                await self.read_back(agent, rng.choice(mine)[0])
                continue
            code = await self.out.write(agent, key, sql)
            if code is None:
                mine.append((key, sql))
            else:
                retry.append((key, sql))
        for key, sql in retry:  # an agent retries what it was not told about, for a while
            for _ in range(20):
                if await self.out.write(agent, key, sql) is None:
                    break
                await asyncio.sleep(0.5)

    async def read_back(self, agent: AgentConn, key: str) -> None:
        self.out.statements += 1
        self.out.reads += 1
        try:
            _, rows = await agent.run(
                f"SELECT count(*) FROM order_state_log WHERE idempotency_key = '{key}'"
            )
        except psycopg.Error as exc:
            self.out.error(exc)
            return
        if rows != [(1,)]:
            self.out.wrong_answers.append(f"read back of {key}: {rows}")

    async def race(self, left: AgentConn, right: AgentConn, seed: int) -> None:
        """Both connections send the same keyed write at once: one runs, one replays."""
        rng = random.Random(seed)
        while await self.think(rng):
            key = self.key()
            sql = keyed_insert(key, left.agent, rng.randint(1, 6), "race")
            codes = await asyncio.gather(
                self.out.write(left, key, sql), self.out.write(right, key, sql)
            )
            self.races += 1
            for agent, code in zip((left, right), codes, strict=True):
                while code is not None and time.monotonic() < self.deadline + 10:
                    code = await self.out.write(agent, key, sql)
            if all(code is None for code in codes):
                replays = int(left.replayed) + int(right.replayed)
                self.race_replays += replays
                if replays != 1:
                    self.out.wrong_answers.append(f"race on {key}: {replays} replays, expected 1")

    async def analytics(self, agent: AgentConn, seed: int) -> None:
        rng = random.Random(seed)
        while await self.think(rng):
            order = rng.randint(1, 6)
            self.out.statements += 1
            self.out.reads += 1
            try:
                _, rows = await agent.run(
                    f"SELECT id, fulfillment_status FROM orders WHERE id = {order}"
                )
            except psycopg.Error as exc:
                self.out.error(exc)
                continue
            if len(rows) != 1 or rows[0][0] != order:
                self.out.wrong_answers.append(f"analytics read of order {order}: {rows}")

    async def sample_servers(self, pg: PgCluster) -> None:
        conn = await psycopg.AsyncConnection.connect(
            pg.dsn("postgres", dbname=shop.SHOP_DB), autocommit=True, connect_timeout=10
        )
        try:
            while True:
                cur = await conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                    "AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
                    (shop.SHOP_DB,),
                )
                row = await cur.fetchone()
                self.peak_servers = max(self.peak_servers, int(row[0]) if row else 0)
                await asyncio.sleep(0.2)
        finally:
            await conn.close()


async def open_clients(
    proxy: Any, agents: list[str], out: Outcomes, parallel: int = 64
) -> list[AgentConn | None]:
    gate = asyncio.Semaphore(parallel)

    async def one(agent: str) -> AgentConn | None:
        async with gate:
            try:
                return await AgentConn.open(proxy.dsn(agent), agent)
            except psycopg.Error as exc:
                out.error(exc)
                return None

    return list(await asyncio.gather(*(one(a) for a in agents)))


def audit_counts(pg: PgCluster, prefix: str) -> dict[str, int]:
    with superuser(pg) as conn:
        return {
            decision: int(n)
            for decision, n in conn.execute(
                "SELECT decision, count(*) FROM guardproxy.audit_events "
                "WHERE statement LIKE %s GROUP BY 1",
                (f"%{prefix}%",),
            )
        }


@pytest.mark.slow
async def test_1000_clients_over_20_servers_lose_and_double_no_idempotent_write(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    pg = clean_shop
    fds = raise_fd_limit(CLIENTS * 2 + 200)
    policies = policies_with(
        tmp_path,
        support={
            "limits": {"max_server_connections": SUPPORT_SERVERS, "max_client_sessions": 1000}
        },
        analytics={
            "limits": {"max_server_connections": ANALYTICS_SERVERS, "max_client_sessions": 1000}
        },
    )
    require_idempotency(policies)
    metrics_port = free_port()
    prefix = f"run-{uuid.uuid4().hex[:8]}-"
    with launch(
        pg,
        tmp_path / "guardproxy.log",
        policies,
        pool_size=OWN_SERVERS,
        max_client_conn=1100,
        pool_acquire_timeout=5,
        metrics_port=metrics_port,
    ) as proxy:
        run = Run(prefix, deadline=0.0, seed=6)
        # (agent ids and SQL avoid the words the proxy pins on: see the next test)
        # a pair is one agent on two connections: keys belong to an agent, and a retry on
        # another connection of the same agent must be answered from the ledger
        agents = [f"support-{i}" for i in range(SUPPORT_SOLO)]
        agents += [f"support-race-{i // 2}" for i in range(2 * RACE_PAIRS)]
        agents += [f"analytics-{i}" for i in range(ANALYTICS_CLIENTS)]
        started = time.monotonic()
        conns = await open_clients(proxy, agents, run.out)
        connect_seconds = time.monotonic() - started
        opened = [c for c in conns if c is not None]
        assert len(opened) == CLIENTS, (
            f"only {len(opened)} of {CLIENTS} clients could log in: {run.out.summary()} "
            f"{run.out.samples}"
        )
        sessions = metric(metrics_port, "guardproxy_client_sessions")
        assert sessions == CLIENTS, f"the proxy counts {sessions} sessions, {CLIENTS} are open"
        support = opened[:SUPPORT_SOLO]
        pairs = opened[SUPPORT_SOLO : SUPPORT_SOLO + 2 * RACE_PAIRS]
        analytics = opened[SUPPORT_SOLO + 2 * RACE_PAIRS :]

        run.deadline = time.monotonic() + DURATION
        sampler = asyncio.create_task(run.sample_servers(pg))
        load_started = time.monotonic()
        tasks = [run.support(c, i) for i, c in enumerate(support)]
        tasks += [run.race(pairs[2 * i], pairs[2 * i + 1], 10_000 + i) for i in range(RACE_PAIRS)]
        tasks += [run.analytics(c, 20_000 + i) for i, c in enumerate(analytics)]
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), DURATION + 60)
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        load_seconds = time.monotonic() - load_started

        # every connection was held all along and still answers
        held = 0
        for conn in opened:
            try:
                _, rows = await asyncio.wait_for(conn.run("SELECT 1"), 30)
                held += rows == [(1,)]
            except psycopg.Error as exc:
                run.out.error(exc)
        await asyncio.gather(*(c.close() for c in opened))
        assert proxy.proc.poll() is None, "guardproxy died under load"

        out = run.out
        figures = (
            f"\nLOAD FIGURES: {held}/{CLIENTS} client connections held for {load_seconds:.1f}s "
            f"(logged in within {connect_seconds:.1f}s; fd limit {fds}); server connections "
            f"(pg_stat_activity, peak) {run.peak_servers} <= {SERVER_BUDGET}\n"
            f"  {out.summary()}; {out.statements / load_seconds:.0f} statements/s\n"
            f"  races {run.races} (replays in them {run.race_replays}); "
            f"unacknowledged at the end {len(out.unacked)}; first error of each kind "
            f"{out.samples}"
        )
        print(figures)
        assert held == CLIENTS, figures
        assert set(out.errors) <= ALLOWED_ERRORS, figures
        assert not out.wrong_answers, f"{out.wrong_answers[:10]}{figures}"
        assert not out.unacked, f"writes never acknowledged: {list(out.unacked)[:5]}{figures}"
        assert run.peak_servers <= SERVER_BUDGET, figures
        assert out.executed > 1000 and out.replayed > 100, f"too little load: {figures}"
        keys, rows = assert_ledger_matches(pg, prefix, out)
        assert keys == rows == len(out.acked) == out.executed, (keys, rows, figures)
        print(f"  ledger: {keys} keys, {rows} rows; writes lost 0, writes doubled 0")

        # a record of every write: each run and each replay is an audit event
        assert metric(metrics_port, "guardproxy_audit_events_lost") == 0
        assert metric(metrics_port, "guardproxy_idempotent_replays") == out.replayed
        deadline = time.monotonic() + 20
        want = {"allowed": out.executed, "replayed": out.replayed}
        while (got := audit_counts(pg, prefix)) != want and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert got == want, f"audit events {got}, writes seen by the clients {want}"


@pytest.mark.timeout(60)
async def test_an_agent_id_containing_load_does_not_take_its_server_for_good(
    shop_db: PgCluster, tmp_path: Path
) -> None:
    """Found by the load test (its agents were first named ``support-load-N``): the proxy
    pins a client to its server when the statement text matches its lexical list
    (LISTEN, TEMP, HOLD, PREPARE, LOAD, ...), and it looks at the text *after* appending
    its own sqlcommenter tag, which carries the agent id. Every agent whose id contains
    one of those words keeps a server from its first statement until it disconnects: a
    few of them starve every other agent of their type (53300 for all)."""
    policies = policies_with(tmp_path, support={"limits": {"max_server_connections": 1}})
    with launch(
        shop_db, tmp_path / "guardproxy.log", policies, pool_size=1, pool_acquire_timeout=2
    ) as proxy:
        named = await AgentConn.open(proxy.dsn("support-load-1"), "support-load-1")
        other = await AgentConn.open(proxy.dsn("support-2"), "support-2")
        try:
            _, rows = await named.run("SELECT id FROM orders WHERE id = 1")
            assert rows == [(1,)]
            # support-load-1 is idle now: the one server of the pool must be free again
            try:
                _, rows = await other.run("SELECT id FROM orders WHERE id = 2")
            except psycopg.Error as exc:
                raise AssertionError(
                    "an idle client still holds the only server: the word 'load' in its agent "
                    f"id pinned it (guardproxy/server/session.py _PIN_RE over the tagged SQL): {exc}"
                ) from None
            assert rows == [(2,)]
        finally:
            await named.close()
            await other.close()
