import asyncio, random, time, uuid
import psycopg
import shop
from proofkit import AgentConn, Outcomes, keyed_insert, launch, policies_with
shop_db = shop.shop_db

async def test_repro(shop_db, tmp_path):
    pol = policies_with(tmp_path, support={"limits": {"max_server_connections": 6, "max_client_sessions": 1000}})
    with launch(shop_db, tmp_path / "l.log", pol, pool_size=1) as p:
        conns = await asyncio.gather(*(AgentConn.open(p.dsn(f"support-{i}"), f"support-{i}") for i in range(200)))
        out = Outcomes()
        bad = []
        end = time.monotonic() + 12
        async def solo(c):
            mine = []
            while time.monotonic() < end:
                await asyncio.sleep(random.uniform(0.05, 0.3))
                if mine and random.random() < 0.4:
                    k, sql = random.choice(mine); kind = "retry"
                else:
                    k = "z-" + uuid.uuid4().hex[:12]; sql = keyed_insert(k, c.agent, 1); kind = "first"
                code = await out.write(c, k, sql)
                if code is None: mine.append((k, sql))
                elif code == "22023": bad.append((kind, k, c.agent, out.samples.get(code)))
        async def race(a, b):
            while time.monotonic() < end:
                await asyncio.sleep(random.uniform(0.05, 0.3))
                k = "r-" + uuid.uuid4().hex[:12]; sql = keyed_insert(k, a.agent, 1)
                codes = await asyncio.gather(out.write(a, k, sql), out.write(b, k, sql))
                for c in codes:
                    if c == "22023": bad.append(("race", k, a.agent, None))
        await asyncio.gather(*(solo(c) for c in conns[:160]), *(race(conns[160+2*i], conns[161+2*i]) for i in range(20)))
        print(out.summary(), bad[:10])
        for k in [b[1] for b in bad[:3]]:
            print(shop_db.psql(f"select key, agent_id, request_hash, created_at from guardproxy.idempotency_keys where key='{k}'", dbname="shop"))
            print([l for l in p.log().splitlines() if k in l][:5])
        for c in conns: await c.close()
