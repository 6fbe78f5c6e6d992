import asyncio, psycopg
import shop
from proofkit import AgentConn, launch, policies_with
shop_db = shop.shop_db

async def test_fns(shop_db, tmp_path):
    pol = policies_with(tmp_path)
    with launch(shop_db, tmp_path / "l.log", pol, pool_size=1) as p:
        a = await AgentConn.open(p.dsn("support-1"), "support-1")
        for sql in ["SELECT pg_backend_pid(), now() = statement_timestamp()",
                    "SELECT length(repeat('x', 1000000)) FROM generate_series(1, 3) g",
                    "SELECT count(*) FROM order_state_log WHERE order_id = 1",
                    "SELECT pg_current_xact_id_if_assigned() IS NULL"]:
            try:
                print(sql, await a.run(sql))
            except psycopg.Error as e:
                print(sql, "ERR", e.sqlstate, e)
        async with a.conn.cursor() as cur:
            try:
                async with cur.copy("COPY order_state_log (order_id, new_status, changed_by, idempotency_key) FROM STDIN") as cp:
                    await cp.write_row((1, "packed", "support-1", "copytest-1"))
                print("copy ok", cur.statusmessage)
            except psycopg.Error as e:
                print("copy ERR", e.sqlstate, e)
        await a.close()
