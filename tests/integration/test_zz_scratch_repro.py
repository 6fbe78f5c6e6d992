import asyncio, random, time, uuid
import psycopg
import shop
from proofkit import AgentConn, Outcomes, keyed_insert, launch, policies_with, ledger_vs_rows
shop_db = shop.shop_db
N = 40

async def test_repro(shop_db, tmp_path):
    pol = policies_with(tmp_path, support={"limits": {"max_server_connections": 2, "max_client_sessions": 1000}})
    with launch(shop_db, tmp_path / "l.log", pol, pool_size=1, log_level="debug") as p:
        conns = await asyncio.gather(*(AgentConn.open(p.dsn(f"support-{i}"), f"support-{i}") for i in range(N)))
        out = Outcomes()
        bad = []
        end = time.monotonic() + 6
        async def solo(c):
            mine = []
            while time.monotonic() < end:
                await asyncio.sleep(random.uniform(0.0, 0.05))
                if mine and random.random() < 0.4:
                    k, sql = random.choice(mine); kind = "retry"
                else:
                    k = "z-" + uuid.uuid4().hex[:12]; sql = keyed_insert(k, c.agent, 1); kind = "first"
                code = await out.write(c, k, sql)
                if code is None: mine.append((k, sql))
                else: bad.append((kind, k, c.agent, code))
        await asyncio.gather(*(solo(c) for c in conns))
        print(out.summary(), bad[:5])
        ledger, rows = ledger_vs_rows(shop_db, "z-")
        print("ledger", len(ledger), "rows", len(rows), "acked", len(out.acked), "executed", out.executed)
        print("ledger without row", len(set(ledger) - set(rows)), "acked not in rows", len(set(out.acked) - set(rows)))
        for k in [b[1] for b in bad[:2]]:
            print(shop_db.psql(f"select key, agent_id, request_hash, command_tag, created_at from guardproxy.idempotency_keys where key='{k}'", dbname="shop"))
        open("/tmp/scratch/repro.log", "w").write(p.log())
        for c in conns: await c.close()
