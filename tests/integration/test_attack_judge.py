"""An outsider's attack on the judge's gaps (issue 13), kept as tests.

Each test sends what an agent controls (SQL text, identifiers, pipelines of raw protocol
messages, context) through a real guardproxy in front of the shop database and judges
the EFFECT: every byte the client received is searched for the denied values
(customers' emails, payments), rows and bytes received are counted against the caps,
rows are read back as superuser, and the budget and ledger tables are read. The review
found four ways past the promises (a table inside an error's text, RETURNING rows of a
managed write past the byte cap, a pipeline of nested statements judged on the event
loop, one queue of judge workers for every agent); they are fixed and their tests pass.
A new finding is marked ``xfail(strict=True)`` until it is fixed.

Covered (the policies are the examples, tightened in ``ATTACK_POLICY``; the database's
own column grants are widened so that the judge alone stands in the way):

* unresolved names fail closed: ``JOIN ... USING (k) AS j``, ``NATURAL JOIN`` and join
  keys on a denied column, join aliases with and without column lists, lateral, CTEs
  (recursive, shadowing the table), subqueries, set operations, row constructors and
  comparisons, whole-row references (``c``, ``c.*``, ``(c).email``, ``c.row_to_json``,
  ``c.text``, casts of a row to text), functions taking a row, column aliases of FROM
  items, ORDER BY / GROUP BY / GROUPING SETS / DISTINCT ON (ordinals too) / WINDOW /
  FILTER / WITHIN GROUP on the denied column, quoted and Unicode-escaped identifiers
  (UESCAPE too), schema- and catalog-qualified names, the XML and text-search
  functions that run a query given as text, cursors, PREPARE, COPY and EXPLAIN
  ANALYZE; simple and extended protocol. Writes: RETURNING (``*``, whole row, casts),
  SET from the column or a subquery, UPDATE ... FROM joins, writable CTEs, INSERT ...
  SELECT, ON CONFLICT on the column's index or reading it in DO UPDATE, MERGE. Another
  agent's WITH HOLD cursor through pg_cursors / pg_cursor() on pooled servers;
* read caps count what leaves: ``WITH TIES`` (top level, after OFFSET, under a CTE, in
  a set operation, in a subquery, in a cursor, in COPY, with Execute row limits),
  ``LIMIT ALL`` / ``NULL`` / a subquery, ``OFFSET``, set-returning functions, COPY of a
  table, of a query, of VALUES, CSV with header and binary, aggregates into one row,
  SHOW ALL and EXPLAIN ANALYZE (bytes), several statements in one Query, scrollable
  cursors with ``FETCH ALL`` / ``ABSOLUTE`` / ``BACKWARD`` / ``LAST`` / ``PRIOR`` /
  ``MOVE`` (rows and bytes, WITH HOLD, declared by Parse and fetched by Query),
  RETURNING rows of writes and their idempotent replay (finding), and a whole table
  carried out in an error message instead of a row (finding);
* one agent cannot stall the others: a 1 MB denied statement, one past
  max_statement_size, a 40 MB Query or Parse trickled in, the same slow statement
  pipelined, a pipeline of distinct slow statements under ``judge_offload_above``
  (finding), and slow statements over it queued in front of another agent's (finding);
* keys and budgets belong to an agent: a key taken first by another agent (comment,
  SET, extended protocol), a loop over fresh task names (comment, SET, startup options
  with reconnects, no task, one Query, a Parse pipeline, one Parse bound again under
  each task, a transaction) against ``per_agent``, four agents against
  ``per_agent_type``, a deliberate repeat without a step (simple, extended with
  parameters, SQL PREPARE), a child row of a soft-deleted order through every insert
  form (literals, expressions, subqueries, multi-row, INSERT ... SELECT from VALUES, a
  series, unnest, a CTE, ON CONFLICT, UNION, a statement prepared before the delete,
  a parameter, COPY);
* the proxy's own SQL: hostile soft-delete reasons (quotes, dollar-quote tags, comment
  ends, percent signs) by comment and by SET land as data.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote as url_quote

import psycopg
import pytest
import shop
from pgcluster import PgCluster
from proofkit import policies_with
from shop import SECRETS, SHOP_DB, ShopProxy, launch_proxy

from guardproxy.protocol import codec

pytestmark = pytest.mark.timeout(120)

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline

WAIT = 5.0  # every read from the proxy is bounded by this (a hang detector)
ATTACKS = 24  # slow statements sent at once by the stall attacks

# The example policies, tightened so that every cap is reachable with the sample rows:
# analytics reads two rows or 1,000 bytes per result; support may write three rows per
# task and, whatever the task names, five write statements per agent and eight per type
# in an hour.
ATTACK_POLICY: dict[str, dict[str, Any]] = {
    "analytics": {"limits": {"max_rows_returned": 2, "max_bytes_returned": 1000}},
    # fulfillment may also rename customers, never read nor write their email
    "fulfillment": {
        "tables": {
            "customers": {
                "ops": ["select", "insert", "update"],
                "update_columns": ["name"],
                "deny_columns": ["email"],
            }
        }
    },
    "support": {
        "limits": {"max_bytes_returned": 2000},
        "budgets": {
            "max_writes_per_task": 3,
            "per_agent": {"max_statements": 5, "window": "1h"},
            "per_agent_type": {"max_statements": 8, "window": "1h"},
        },
    },
}

EMAILS = tuple(s for s in SECRETS if "@" in s)


# ---------------------------------------------------------------- wire messages


def parse(name: bytes, sql: str) -> bytes:
    return codec.message(b"P", name + b"\x00" + sql.encode() + b"\x00" + struct.pack("!h", 0))


def bind(portal: bytes = b"", statement: bytes = b"") -> bytes:
    body = portal + b"\x00" + statement + b"\x00" + struct.pack("!hhh", 0, 0, 0)
    return codec.message(b"B", body)


def execute(portal: bytes = b"", limit: int = 0) -> bytes:
    return codec.message(b"E", portal + b"\x00" + struct.pack("!i", limit))


def query(sql: str) -> bytes:
    return codec.message(b"Q", sql.encode() + b"\x00")


SYNC = codec.message(b"S", b"")

Msgs = list[tuple[bytes, bytes]]


def errors(msgs: Msgs) -> list[str]:
    return [codec.error_fields(raw).get("C", "?") for kind, raw in msgs if kind == b"E"]


def messages(msgs: Msgs) -> list[str]:
    return [codec.error_fields(raw).get("M", "") for kind, raw in msgs if kind in b"EN"]


def rows(msgs: Msgs) -> list[list[str | None]]:
    out = []
    for kind, raw in msgs:
        if kind != b"D":
            continue
        payload = raw[5:]
        (count,) = struct.unpack_from("!h", payload, 0)
        pos, row = 2, []
        for _ in range(count):
            (size,) = struct.unpack_from("!i", payload, pos)
            pos += 4
            row.append(None if size < 0 else payload[pos : pos + size].decode())
            pos += max(size, 0)
        out.append(row)
    return out


def row_bytes(msgs: Msgs) -> int:
    """Bytes of row data received: DataRow and CopyData payloads."""
    return sum(len(raw) - 5 for kind, raw in msgs if kind in (b"D", b"d"))


def copy_lines(msgs: Msgs) -> list[bytes]:
    return [raw[5:] for kind, raw in msgs if kind == b"d"]


class Wire:
    """One raw protocol connection (trust login) that keeps every byte it received."""

    def __init__(self, port: int, user: str, **params: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.sock.sendall(codec.build_startup({"user": user, "database": SHOP_DB, **params}))
        self.buf = b""
        self.received = b""
        self.until(b"Z")

    def send(self, *msgs: bytes) -> None:
        self.sock.sendall(b"".join(msgs))

    def until(self, kind: bytes = b"Z", count: int = 1, timeout: float = WAIT) -> Msgs:
        got: Msgs = []
        seen = 0
        deadline = time.monotonic() + timeout
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
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kind!r} within {timeout}s; got {len(got)} messages")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk
            self.received += chunk

    def q(self, sql: str, timeout: float = WAIT) -> Msgs:
        self.send(query(sql))
        return self.until(b"Z", timeout=timeout)

    def ok(self, sql: str) -> Msgs:
        got = self.q(sql)
        assert not errors(got), (sql, messages(got))
        return got

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(codec.TERMINATE)
        self.sock.close()


@contextlib.contextmanager
def wire(port: int, user: str, **params: str) -> Iterator[Wire]:
    conn = Wire(port, user, **params)
    try:
        yield conn
    finally:
        conn.close()


def leaked(data: bytes, secrets: tuple[str, ...] = EMAILS) -> list[str]:
    """The secrets found in ``data`` (also in their hex, base64-free plain forms)."""
    text = data.decode("utf-8", errors="replace").lower()
    found = [s for s in secrets if s.lower() in text]
    found += [s for s in secrets if s.encode().hex() in text]
    return found


# ---------------------------------------------------------------- the shop, as superuser


def su(pg: PgCluster, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(
        pg.dsn("postgres", dbname=SHOP_DB), autocommit=True, connect_timeout=int(WAIT)
    ) as conn:
        cur = conn.execute(sql, args or None)
        return cur.fetchall() if cur.description else []


_RESET_SQL = [
    "UPDATE orders SET deleted_at = NULL, deleted_by = NULL, delete_reason = NULL "
    "WHERE deleted_by LIKE '%atk13%'",
    "DELETE FROM order_state_log WHERE changed_by LIKE '%atk13%'",
    "DELETE FROM guardproxy.task_budgets WHERE task LIKE 'atk13-%'",
    "DELETE FROM guardproxy.idempotency_keys WHERE agent_id LIKE '%atk13%'",
    "DELETE FROM guardproxy.deleted_rows WHERE agent_id LIKE '%atk13%'",
    "DELETE FROM guardproxy.budget_usage",
    "UPDATE orders SET fulfillment_status = 'pending' WHERE id IN (4, 5)",
]


def reset(pg: PgCluster) -> None:
    for sql in _RESET_SQL:
        su(pg, sql)
    for i, name in CUSTOMER_NAMES.items():
        su(pg, "UPDATE customers SET name = %s WHERE id = %s AND name <> %s", name, i, name)


def customer_names(pg: PgCluster) -> dict[int, str]:
    return {int(i): str(n) for i, n in su(pg, "SELECT id, name FROM customers ORDER BY id")}


CUSTOMER_NAMES: dict[int, str] = {}  # as loaded, filled in by the module's proxy fixture


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shop_restored(shop_db: PgCluster, shop_baseline: dict[str, Any]) -> Iterator[PgCluster]:
    yield shop_db
    if shop.snapshot(shop_db) != shop_baseline:
        shop.restore_shop(shop_db)


@pytest.fixture(scope="module")
def judge_proxy(
    shop_restored: PgCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ShopProxy]:
    # The judge alone stands between analytics and customers.email: the column grants of
    # `guardproxy roles` (the database's defence in depth) are widened, as in a deployment
    # that never ran the script, so that a judge gap shows as a leak and not as
    # Postgres's "permission denied".
    su(shop_restored, "GRANT SELECT ON customers, payments TO guard_analytics")
    su(shop_restored, "GRANT SELECT, INSERT, UPDATE ON customers TO guard_fulfillment")
    CUSTOMER_NAMES.update(customer_names(shop_restored))
    directory = tmp_path_factory.mktemp("attack-judge")
    policies = policies_with(directory, **ATTACK_POLICY)
    with launch_proxy(shop_restored, directory / "guardproxy.log", policies=policies) as proxy:
        yield proxy
        assert "Traceback" not in proxy.log(), proxy.log()[-4000:]
    su(shop_restored, "REVOKE SELECT ON customers, payments FROM guard_analytics")
    su(shop_restored, "REVOKE ALL ON customers FROM guard_fulfillment")
    su(shop_restored, "GRANT SELECT (id, name, created_at) ON customers TO guard_analytics")


@pytest.fixture
def fresh(
    shop_restored: PgCluster, judge_proxy: ShopProxy, request: pytest.FixtureRequest
) -> Iterator[PgCluster]:
    reset(shop_restored)
    since = len(judge_proxy.log())
    yield shop_restored
    shop.dump_log_on_failure(request, judge_proxy, since)
    reset(shop_restored)


# ================================================================ unresolved names fail closed

# Every way found to reach customers.email (denied to analytics): read, compare, sort,
# group, hash or carry it. Each must be refused, and no email may reach the client.
EMAIL_READS = [
    # join columns: the alias of USING, NATURAL JOIN, keys compared by joins
    "SELECT j.email FROM customers a JOIN customers b USING (email) AS j",
    "SELECT j.* FROM customers a JOIN customers b USING (email) AS j",
    "SELECT count(*) FROM customers a JOIN customers b USING (email)",
    "SELECT count(*) FROM customers a NATURAL JOIN customers b",
    "SELECT count(*) FROM customers c1 JOIN customers c2 USING (id, email)",
    "SELECT count(*) FROM (VALUES ('ada@example.com')) v(email) JOIN customers USING (email)",
    "SELECT count(*) FROM customers a JOIN customers b ON a.email = b.email",
    "SELECT j.email FROM (customers a JOIN orders b ON a.id = b.customer_id) j",
    "SELECT j.x FROM (customers a JOIN orders b ON a.id = b.customer_id) j(p, q, x)",
    "SELECT j FROM (customers a JOIN orders b ON a.id = b.customer_id) j",
    # column aliases of FROM items, subqueries, CTEs, lateral
    "SELECT s.x FROM (SELECT * FROM customers) s(a, b, x, d)",
    "SELECT s.x FROM (TABLE customers) s(a, b, x, d)",
    "SELECT e2 FROM customers AS x(id, name, e2)",
    "SELECT x.e FROM customers c, LATERAL (SELECT c.email AS e) x",
    "SELECT x.email FROM customers c, LATERAL (SELECT c.*) x",
    "SELECT t.e FROM customers c CROSS JOIN LATERAL (VALUES (c.email)) t(e)",
    "SELECT * FROM customers c CROSS JOIN LATERAL unnest(ARRAY[c.email]) u",
    "WITH t(e) AS (SELECT email FROM customers) SELECT e FROM t",
    "WITH t AS (SELECT * FROM customers) SELECT email FROM t",
    "WITH a(x, y, z) AS (SELECT * FROM customers) SELECT z FROM a",
    "WITH customers AS (SELECT * FROM customers) SELECT email FROM customers",
    "WITH RECURSIVE t(e) AS (SELECT email FROM customers UNION SELECT e FROM t) SELECT e FROM t",
    "SELECT (SELECT c.email) FROM customers c",
    "SELECT (SELECT 1 WHERE c.email LIKE 'a%') FROM customers c",
    # set operations, row constructors and comparisons
    "SELECT name FROM customers UNION ALL SELECT email FROM customers",
    "SELECT email FROM customers EXCEPT SELECT 'x'",
    "SELECT count(*) FROM customers c WHERE (c.id, c.email) = (1, 'ada@example.com')",
    "SELECT 'ada@example.com' = ANY (SELECT email FROM customers)",
    # whole-row references and functions that take a row
    "SELECT c FROM customers c",
    "SELECT customers FROM customers",
    "SELECT c::text FROM customers c",
    "SELECT (c).email FROM customers c",
    "SELECT (c).* FROM customers c",
    "SELECT (c.*).* FROM customers c",
    "SELECT c.row_to_json FROM customers c",
    "SELECT c.text FROM customers c",
    "SELECT s.to_jsonb FROM (SELECT c.* FROM customers c) s",
    "SELECT to_jsonb(c) FROM customers c",
    "SELECT json_agg(c) FROM customers c",
    "SELECT json_object_agg(c.id, c) FROM customers c",
    "SELECT format('%s', c) FROM customers c",
    "SELECT concat(c) FROM customers c",
    "SELECT ARRAY(SELECT ROW(c.*) FROM customers c)",
    "SELECT (ROW(c.*)::customers).email FROM customers c",
    "SELECT (jsonb_populate_record(NULL::customers, to_jsonb(c))).email FROM customers c",
    "SELECT x FROM customers c, LATERAL (SELECT c) s(x)",
    "WITH a AS (SELECT * FROM customers) SELECT a FROM a",
    "SELECT id FROM customers c WHERE c::text LIKE '%ada%'",
    "SELECT id FROM customers c WHERE to_tsvector(c) @@ 'ada'",
    "SELECT hashtext(c::text) FROM customers c",
    "SELECT count(DISTINCT c) FROM customers c",
    # ordering, grouping, windows on the denied column (an oracle of its order)
    "SELECT name FROM customers ORDER BY email",
    "SELECT name FROM customers ORDER BY email USING <",
    "SELECT id FROM customers c ORDER BY c",
    "SELECT DISTINCT ON (email) id FROM customers",
    "SELECT DISTINCT ON (2) id, email FROM customers",
    "SELECT * FROM (SELECT id, email FROM customers) s(a) ORDER BY 2",
    "SELECT id FROM customers GROUP BY email, id",
    "SELECT id FROM customers GROUP BY GROUPING SETS ((id), (email))",
    "SELECT row_number() OVER w FROM customers WINDOW w AS (ORDER BY email)",
    "SELECT first_value(name) OVER (PARTITION BY email) FROM customers",
    "SELECT count(*) FILTER (WHERE email LIKE 'a%') FROM customers",
    "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY email) FROM customers",
    "SELECT string_agg(name, ',' ORDER BY email) FROM customers",
    "SELECT 1 FROM customers HAVING bool_or(email LIKE 'a%')",
    # names: quoted, Unicode escapes, qualified
    'SELECT "customers"."email" FROM "customers"',
    'SELECT U&"\\0065mail" FROM customers',
    "SELECT U&\"!0065mail\" UESCAPE '!' FROM customers",
    'SELECT U&"\\0063ustomers".U&"\\0065mail" FROM customers',
    "SELECT public.customers.email FROM public.customers",
    "SELECT shop.public.customers.email FROM public.customers",
    "SELECT customers.email FROM public.customers",
    "SELECT x.email FROM customers x JOIN orders email ON true",
    # functions that run a query given as text
    "SELECT query_to_xml('select email from customers', true, false, '')",
    "SELECT table_to_xml('customers', true, false, '')",
    "SELECT * FROM ts_stat('select to_tsvector(email) from customers')",
    "SELECT database_to_xml(true, false, '')",
    # cursors and prepared statements carry the same reads
    "DECLARE k CURSOR FOR SELECT j.email FROM customers a JOIN customers b USING (email) AS j",
    "PREPARE k AS SELECT (c).email FROM customers c",
    "COPY (SELECT j.email FROM customers a JOIN customers b USING (email) AS j) TO STDOUT",
    "COPY customers TO STDOUT",
    "EXPLAIN ANALYZE SELECT email FROM customers",
]


@pytest.mark.parametrize("protocol", ["simple", "extended"])
@pytest.mark.parametrize("sql", EMAIL_READS)
def test_no_form_reaches_a_denied_column(
    fresh: PgCluster, judge_proxy: ShopProxy, protocol: str, sql: str
) -> None:
    with wire(judge_proxy.port, "analytics-atk13-cols") as agent:
        if protocol == "simple":
            got = agent.q(sql)
        else:
            agent.send(parse(b"", sql), bind(), execute(), SYNC)
            got = agent.until(b"Z")
        assert errors(got) and errors(got)[0] == "42501", (errors(got), messages(got))
        assert not rows(got)
        assert not leaked(agent.received), leaked(agent.received)
        agent.ok("SELECT 1")  # the session stays usable


# Writes of fulfillment (customers.email denied, name updatable) that would read the
# email: RETURNING, SET from it, joins and conditions on it, ON CONFLICT on its index.
EMAIL_IN_WRITES = [
    "UPDATE customers SET name = name WHERE id = 1 RETURNING email",
    "UPDATE customers SET name = name WHERE id = 1 RETURNING *",
    "UPDATE customers c SET name = name WHERE id = 1 RETURNING c",
    "UPDATE customers c SET name = name WHERE id = 1 RETURNING c::text",
    "UPDATE customers c SET name = name WHERE id = 1 RETURNING to_jsonb(c)",
    "UPDATE customers c SET name = name WHERE id = 1 RETURNING (c).email",
    "UPDATE customers SET name = email WHERE id = 1",
    "UPDATE customers c SET name = c::text WHERE id = 1",
    "UPDATE customers SET name = (SELECT d.email FROM customers d WHERE d.id = 2) WHERE id = 1",
    "UPDATE customers SET (name) = (SELECT email FROM customers d WHERE d.id = 1) WHERE id = 1",
    "UPDATE customers c SET name = d.email FROM customers d WHERE c.id = 1 AND d.id = 2",
    "UPDATE customers c SET name = d.x FROM (SELECT * FROM customers) d(a, b, x) "
    "WHERE c.id = 1 AND d.a = 2",
    "UPDATE customers c SET name = j.email FROM customers a JOIN customers b USING (email) AS j "
    "WHERE c.id = 1",
    "UPDATE customers SET name = name WHERE email LIKE 'ada%'",
    "UPDATE customers SET name = name WHERE id = 1 AND email = 'ada@example.com'",
    "WITH u AS (UPDATE customers SET name = name WHERE id = 1 RETURNING *) SELECT email FROM u",
    "INSERT INTO customers (id, name) SELECT 100, email FROM customers WHERE id = 1",
    "INSERT INTO customers (id, name) VALUES (1, 'x') ON CONFLICT (email) DO NOTHING",
    "INSERT INTO customers (id, name) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE "
    "SET name = customers.email",
    "INSERT INTO customers (id, name) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE "
    "SET name = excluded.name WHERE customers.email LIKE 'a%'",
    "MERGE INTO customers c USING (VALUES (1)) v(i) ON c.id = v.i "
    "WHEN MATCHED THEN UPDATE SET name = c.email",
    "MERGE INTO customers c USING (VALUES ('ada@example.com')) v(e) ON c.email = v.e "
    "WHEN MATCHED THEN UPDATE SET name = name",
]


@pytest.mark.parametrize("protocol", ["simple", "extended"])
@pytest.mark.parametrize("sql", EMAIL_IN_WRITES)
def test_no_write_reads_a_denied_column(
    fresh: PgCluster, judge_proxy: ShopProxy, protocol: str, sql: str
) -> None:
    pg = fresh
    with wire(judge_proxy.port, "fulfillment-atk13-w") as agent:
        if protocol == "simple":
            got = agent.q(sql)
        else:
            agent.send(parse(b"", sql), bind(), execute(), SYNC)
            got = agent.until(b"Z")
        assert errors(got), rows(got)
        assert not leaked(agent.received), leaked(agent.received)
        agent.ok("SELECT 1")
    assert customer_names(pg) == CUSTOMER_NAMES
    assert not su(pg, "SELECT id FROM customers WHERE id = 100")


def test_an_allowed_rename_still_works(fresh: PgCluster, judge_proxy: ShopProxy) -> None:
    pg = fresh
    with wire(judge_proxy.port, "fulfillment-atk13-w") as agent:
        got = agent.ok("UPDATE customers SET name = 'Renamed' WHERE id = 1 RETURNING id, name")
        assert rows(got) == [["1", "Renamed"]]
    assert customer_names(pg)[1] == "Renamed"


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT (ROW(c.id, c.name)).f1 FROM customers c",
        "SELECT x FROM customers c, LATERAL (SELECT c.name) s(x)",
        "WITH a AS (SELECT id, name FROM customers) SELECT * FROM a",
        "SELECT id, name, created_at FROM customers ORDER BY id",
        "SELECT count(*) FROM customers a JOIN customers b USING (id)",
    ],
)
def test_reads_of_the_allowed_columns_still_work(
    fresh: PgCluster, judge_proxy: ShopProxy, sql: str
) -> None:
    with wire(judge_proxy.port, "analytics-atk13-cols") as agent:
        got = agent.ok(sql)
        assert rows(got)
        assert not leaked(agent.received)


@pytest.mark.parametrize("leave", ["stays connected", "disconnects"])
def test_another_agents_held_cursor_is_not_visible_through_the_pool(
    fresh: PgCluster, judge_proxy: ShopProxy, leave: str
) -> None:
    """pg_cursors and pg_cursor() are allowed catalogs; they show the cursors of the
    server session, statement text included. An agent of the same type whose WITH HOLD
    cursor outlives its transaction must not lend it, nor its text, to another agent
    served by the same pooled server."""
    secret = "victim-secret-7f3a"
    victim = Wire(judge_proxy.port, "analytics-atk13-victim", options="-c guard.task=atk13-vt")
    try:
        victim.ok("BEGIN")
        victim.ok(
            "DECLARE k CURSOR WITH HOLD FOR SELECT id FROM orders "
            f"WHERE coalesce(tracking_number, '') <> '{secret}'"
        )
        victim.ok("COMMIT")
        if leave == "disconnects":
            victim.close()
        spies = [Wire(judge_proxy.port, f"analytics-atk13-spy{i}") for i in range(6)]
        try:
            for _ in range(3):
                for spy in spies:
                    spy.q("SELECT name, statement FROM pg_cursors")
                    spy.q("SELECT name, statement FROM pg_cursor()")
                    spy.q("FETCH ALL FROM k")
            seen = b"".join(spy.received for spy in spies)
            assert secret.encode() not in seen
            assert b"atk13-vt" not in seen
        finally:
            for spy in spies:
                spy.close()
        if leave == "stays connected":
            assert rows(victim.ok("FETCH 1 FROM k"))  # still the victim's own
    finally:
        victim.close()


# ================================================================ read caps count what leaves

ROW_CAP, BYTE_CAP = 2, 1000  # analytics, as tightened in ATTACK_POLICY

# Reads of analytics that would return more than the caps without them: rows (the six
# orders, generated series, ties) or bytes (one wide row).
WIDE_READS = {
    "with ties on a constant": "SELECT id FROM orders ORDER BY 'x' FETCH FIRST 1 ROW WITH TIES",
    "with ties after an offset": (
        "SELECT id FROM orders ORDER BY 'x' OFFSET 0 ROWS FETCH FIRST 1 ROW WITH TIES"
    ),
    "with ties under a CTE": (
        "WITH x AS (SELECT 1) SELECT id FROM orders ORDER BY 'x' FETCH FIRST 1 ROW WITH TIES"
    ),
    "with ties in a set operation": (
        "(SELECT id FROM orders ORDER BY 'x' FETCH FIRST 1 ROW WITH TIES) UNION ALL SELECT 0"
    ),
    "with ties in a subquery": (
        "SELECT * FROM (SELECT id FROM orders ORDER BY 'x' FETCH FIRST 1 ROW WITH TIES) s"
    ),
    "with ties, percent-free large fetch": "SELECT id FROM orders FETCH FIRST 1000 ROWS WITH TIES",
    "limit all": "SELECT id FROM orders LIMIT ALL",
    "limit null": "SELECT id FROM orders LIMIT NULL",
    "limit from a subquery": "SELECT id FROM orders LIMIT (SELECT 1000)",
    "offset only": "SELECT id FROM orders OFFSET 1",
    "set returning function": "SELECT generate_series(1, 5000)",
    "cross join": "SELECT o.id, g FROM orders o, generate_series(1, 3) g",
    "values": "VALUES (1), (2), (3), (4)",
    "table": "TABLE orders",
    "one wide row": "SELECT repeat('x', 5000)",
    "a table in one row": "SELECT string_agg(repeat(fulfillment_status, 50), ',') FROM orders",
    "json_agg of rows": "SELECT json_agg(o) FROM orders o, generate_series(1, 20) g",
    "array_agg": "SELECT array_agg(g) FROM generate_series(1, 2000) g",
    "show all": "SHOW ALL",
    "explain analyze": "EXPLAIN (ANALYZE, VERBOSE) SELECT * FROM orders o, generate_series(1, 9) g "
    "WHERE o.id > g",
    "copy a table": "COPY orders TO STDOUT",
    "copy a query with ties": (
        "COPY (SELECT id FROM orders ORDER BY 'x' FETCH FIRST 1 ROW WITH TIES) TO STDOUT"
    ),
    "copy values": "COPY (VALUES (1), (2), (3), (4)) TO STDOUT",
    "copy a wide row": "COPY (SELECT repeat('x', 5000)) TO STDOUT",
    "copy csv with header": "COPY (SELECT id FROM orders) TO STDOUT WITH (FORMAT csv, HEADER)",
    "copy binary": "COPY (SELECT id FROM orders) TO STDOUT WITH (FORMAT binary)",
}


def assert_within_caps(got: Msgs, rows_capped: bool = True, extra_lines: int = 0) -> None:
    """Rows and bytes of one result within the caps (``rows_capped``: False for SHOW and
    EXPLAIN, which the docs bound by bytes only; ``extra_lines``: CopyData messages that
    are no row, a CSV header or a binary header and trailer)."""
    data = rows(got)
    lines = copy_lines(got)
    assert len(data) <= ROW_CAP or not rows_capped, data
    assert len(lines) <= ROW_CAP + extra_lines, lines
    assert row_bytes(got) <= BYTE_CAP, row_bytes(got)


@pytest.mark.parametrize("protocol", ["simple", "extended"])
@pytest.mark.parametrize("case", sorted(WIDE_READS))
def test_a_read_returns_at_most_its_caps(
    fresh: PgCluster, judge_proxy: ShopProxy, case: str, protocol: str
) -> None:
    sql = WIDE_READS[case]
    with wire(judge_proxy.port, "analytics-atk13-caps") as agent:
        if protocol == "simple":
            got = agent.q(sql)
        else:
            agent.send(parse(b"", sql), bind(), execute(), SYNC)
            got = agent.until(b"Z")
        if sql.startswith("COPY") and protocol == "extended":
            assert not [k for k, _ in got if k == b"D"]
        extra = 2 if "binary" in sql else 1 if "HEADER" in sql else 0
        assert_within_caps(got, not sql.startswith(("SHOW", "EXPLAIN")), extra)
        agent.ok("SELECT 1")


def test_several_statements_in_one_query_are_each_capped(
    fresh: PgCluster, judge_proxy: ShopProxy
) -> None:
    with wire(judge_proxy.port, "analytics-atk13-caps") as agent:
        got = agent.q(
            "SELECT id FROM orders; SELECT id FROM orders ORDER BY 'x' FETCH FIRST 1 ROW WITH "
            "TIES; COPY orders TO STDOUT; SELECT repeat('y', 3000)"
        )
        # four results, each within the caps
        results: list[Msgs] = [[]]
        for kind, raw in got:
            results[-1].append((kind, raw))
            if kind == b"C":
                results.append([])
        for result in results:
            assert_within_caps(result)


@pytest.mark.parametrize(
    "fetches",
    [
        ["FETCH ALL FROM k"],
        ["FETCH 1 FROM k", "FETCH 1 FROM k", "FETCH 1 FROM k", "FETCH ALL FROM k"],
        ["FETCH ABSOLUTE 5 FROM k", "FETCH BACKWARD ALL FROM k", "FETCH ALL FROM k"],
        ["MOVE ALL IN k", "FETCH BACKWARD ALL FROM k", "FETCH FIRST FROM k"],
        ["FETCH ALL FROM k", "MOVE ABSOLUTE 0 IN k", "FETCH ALL FROM k"],
        [
            "FETCH LAST FROM k",
            "FETCH PRIOR FROM k",
            "FETCH PRIOR FROM k",
            "FETCH RELATIVE -1 FROM k",
        ],
    ],
)
@pytest.mark.parametrize(
    "cursor",
    [
        "DECLARE k SCROLL CURSOR FOR SELECT id FROM orders ORDER BY id",
        "DECLARE k SCROLL CURSOR FOR SELECT id FROM orders ORDER BY 'x' FETCH FIRST 1 ROW WITH TIES",
        "DECLARE k SCROLL CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 50) g",
    ],
)
def test_a_scrollable_cursor_returns_at_most_the_cap_over_all_its_fetches(
    fresh: PgCluster, judge_proxy: ShopProxy, cursor: str, fetches: list[str]
) -> None:
    with wire(judge_proxy.port, "analytics-atk13-caps") as agent:
        got: Msgs = agent.ok("BEGIN")
        got += agent.q(cursor)
        for fetch in fetches:
            got += agent.q(fetch)
        got += agent.q("COMMIT")
        values = [r[0] for r in rows(got)]
        assert len(values) <= ROW_CAP, values
        assert len(set(values)) <= ROW_CAP, values
        agent.q("CLOSE k")


@pytest.mark.parametrize("how", ["one message", "declared by parse, fetched by query"])
def test_a_cursor_cap_holds_across_message_kinds(
    fresh: PgCluster, judge_proxy: ShopProxy, how: str
) -> None:
    cursor = "DECLARE k SCROLL CURSOR FOR SELECT g FROM generate_series(1, 50) g"
    with wire(judge_proxy.port, "analytics-atk13-caps") as agent:
        if how == "one message":
            got = agent.q(
                f"BEGIN; {cursor}; FETCH ALL FROM k; FETCH BACKWARD ALL FROM k; "
                "FETCH ABSOLUTE 40 FROM k; FETCH ALL FROM k; COMMIT"
            )
        else:
            agent.ok("BEGIN")
            agent.send(parse(b"", cursor), bind(), execute(), SYNC)
            got = agent.until(b"Z")
            for fetch in ("FETCH ALL FROM k", "FETCH BACKWARD ALL FROM k", "FETCH LAST FROM k"):
                got += agent.q(fetch)
            agent.send(parse(b"", "FETCH ABSOLUTE 30 FROM k"), bind(), execute(), SYNC)
            got += agent.until(b"Z")
            agent.q("COMMIT")
        values = [r[0] for r in rows(got)]
        assert len(values) <= ROW_CAP, values


def test_a_portal_executed_over_several_rounds_of_one_transaction_shares_the_cap(
    fresh: PgCluster, judge_proxy: ShopProxy
) -> None:
    with wire(judge_proxy.port, "analytics-atk13-caps") as agent:
        agent.ok("BEGIN")
        agent.send(parse(b"w", "SELECT g FROM generate_series(1, 50) g"), bind(b"p", b"w"), SYNC)
        got = agent.until(b"Z")
        for limit in (1, 1, 1, 0, 0):
            agent.send(execute(b"p", limit), SYNC)
            got += agent.until(b"Z")
        agent.q("COMMIT")
        assert len(rows(got)) <= ROW_CAP, rows(got)


@pytest.mark.parametrize("limits", [(1, 1, 1, 1), (3, 3), (0,)])
def test_executes_with_row_limits_share_the_portals_cap(
    fresh: PgCluster, judge_proxy: ShopProxy, limits: tuple[int, ...]
) -> None:
    with wire(judge_proxy.port, "analytics-atk13-caps") as agent:
        agent.send(
            parse(b"w", "SELECT id FROM orders ORDER BY 'x' FETCH FIRST 1 ROW WITH TIES"),
            bind(b"p", b"w"),
            *(execute(b"p", n) for n in limits),
            SYNC,
        )
        got = agent.until(b"Z")
        assert len(rows(got)) <= ROW_CAP, rows(got)


@pytest.mark.parametrize(
    "how", ["fetches", "scroll back", "with hold", "extended portal", "extended fetches"]
)
def test_a_cursor_returns_at_most_the_byte_cap_over_all_its_fetches(
    fresh: PgCluster, judge_proxy: ShopProxy, how: str
) -> None:
    """Rows of 600 bytes: one fits under max_bytes_returned (1,000), two do not, however
    they are fetched."""
    wide = "SELECT g, repeat('w', 600) FROM generate_series(1, 2) g"
    with wire(judge_proxy.port, "analytics-atk13-bytes") as agent:
        got: Msgs = []
        if how == "extended portal":
            agent.send(parse(b"w", wide), bind(b"p", b"w"), execute(b"p", 1), execute(b"p", 1))
            agent.send(SYNC)
            got = agent.until(b"Z")
        elif how == "extended fetches":
            agent.ok("BEGIN")
            agent.send(
                parse(b"", f"DECLARE k SCROLL CURSOR FOR {wide}"),
                bind(),
                execute(),
                *(m for _ in range(3) for m in (parse(b"", "FETCH 1 FROM k"), bind(), execute())),
                SYNC,
            )
            got = agent.until(b"Z")
            assert not errors(got), messages(got)
            agent.q("ROLLBACK")
        else:
            agent.ok("BEGIN")
            hold = " WITH HOLD" if how == "with hold" else ""
            agent.ok(f"DECLARE k SCROLL CURSOR{hold} FOR {wide}")
            got += agent.q("FETCH 1 FROM k")
            if how == "with hold":
                agent.ok("COMMIT")
            if how == "scroll back":
                got += agent.q("FETCH ABSOLUTE 2 FROM k")
                got += agent.q("FETCH BACKWARD 1 FROM k")
            got += agent.q("FETCH 1 FROM k")
            got += agent.q("FETCH ALL FROM k")
            agent.q("ROLLBACK")
            agent.q("CLOSE k")
        assert row_bytes(got) <= BYTE_CAP, row_bytes(got)


SUPPORT_BYTE_CAP = 2000  # support's max_bytes_returned, as tightened in ATTACK_POLICY
WIDE_RETURNING = (
    "UPDATE orders SET fulfillment_status = fulfillment_status WHERE id <= 3 "
    "RETURNING id, repeat(fulfillment_status, 120)"
)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT id, repeat(fulfillment_status, 120) FROM orders WHERE id <= 3",
        "COPY (SELECT id, repeat(fulfillment_status, 120) FROM orders WHERE id <= 3) TO STDOUT",
    ],
)
def test_a_support_read_is_bounded_by_its_byte_cap(
    fresh: PgCluster, judge_proxy: ShopProxy, sql: str
) -> None:
    """The control: the same rows read by support are cut at its byte cap."""
    with wire(judge_proxy.port, "support-atk13-ret") as agent:
        got = agent.q(sql)
        assert row_bytes(got) <= SUPPORT_BYTE_CAP, row_bytes(got)


@pytest.mark.parametrize("how", ["plain", "keyed", "keyed retry", "extended"])
def test_returning_rows_of_a_write_are_bounded_by_the_byte_cap_even_when_replayed(
    fresh: PgCluster, judge_proxy: ShopProxy, how: str
) -> None:
    """Three RETURNING rows of about 900 bytes: past support's byte cap (2,000) whether
    the write runs or its stored answer is replayed to a retry."""
    with wire(judge_proxy.port, "support-atk13-ret") as agent:
        sql = WIDE_RETURNING
        if how.startswith("keyed"):
            sql = f"/* idempotency_key='atk13-ret' */ {sql}"
        if how == "extended":
            agent.send(parse(b"", sql), bind(), execute(), SYNC)
            got = agent.until(b"Z")
        else:
            got = agent.q(sql)
            if how == "keyed retry":
                got = agent.q(sql)
                assert any("replay" in m for m in messages(got)), messages(got)
        assert row_bytes(got) <= SUPPORT_BYTE_CAP, row_bytes(got)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT (SELECT string_agg(repeat(o.id || ':' || o.fulfillment_status || ';', 40), '') "
        "FROM orders o)::int",
        "SELECT (SELECT json_agg(o) FROM orders o, generate_series(1, 20) g)::text::int",
        "SELECT 1 WHERE (SELECT array_agg(c.name || repeat('-', 300)) FROM customers c)"
        "::text::int > 0",
    ],
)
def test_a_table_cannot_leave_in_an_error_message(
    fresh: PgCluster, judge_proxy: ShopProxy, sql: str
) -> None:
    """The same data as a row is cut by max_bytes_returned; as the text of the error a
    cast raises ('invalid input syntax for type integer: "1:delivered;..."'), every byte
    of it reaches the agent."""
    with wire(judge_proxy.port, "analytics-atk13-caps") as agent:
        as_row = agent.q(sql.replace("::int", "", 1).replace("::text::int > 0", " IS NOT NULL"))
        assert row_bytes(as_row) <= BYTE_CAP
        got = agent.q(sql)
        assert errors(got)
        carried = sum(len(m) for m in messages(got))
        assert carried <= BYTE_CAP, f"{carried} bytes of table data left in an error"


# ================================================================ keys and budgets belong to an agent

LOG_COLUMNS = "(order_id, previous_status, new_status, changed_by, reason, idempotency_key)"


def log_insert(who: str, reason: str, order_id: int | str = 2) -> str:
    return (
        f"INSERT INTO order_state_log {LOG_COLUMNS} "
        f"VALUES ({order_id}, 'shipped', 'delivered', '{who}', '{reason}', NULL) RETURNING id"
    )


def log_rows_of(pg: PgCluster, who: str) -> list[tuple[Any, ...]]:
    return su(pg, "SELECT id, reason FROM order_state_log WHERE changed_by = %s ORDER BY id", who)


def keyed_write(agent: Wire, how: str, key: str, sql: str) -> Msgs:
    """``sql`` run by ``agent`` with idempotency key ``key``, set ``how``."""
    if how == "comment":
        return agent.q(f"/* idempotency_key='{key}' */ {sql}")
    if how == "set":
        agent.ok(f"SET guard.idempotency_key = '{key}'")
        got = agent.q(sql)
        agent.ok("RESET guard.idempotency_key")
        return got
    agent.send(parse(b"", f"/* idempotency_key='{key}' */ {sql}"), bind(), execute(), SYNC)
    return agent.until(b"Z")


@pytest.mark.parametrize("how", ["comment", "set", "extended"])
def test_a_key_taken_first_by_another_agent_neither_blocks_nor_answers_the_owner(
    fresh: PgCluster, judge_proxy: ShopProxy, how: str
) -> None:
    """The attacker takes the victim's key first, with the very statement the victim
    will send: the victim's write still runs, and gets its own row back, not the
    attacker's stored answer; each agent's retry is replayed to itself only."""
    pg = fresh
    victim_sql = log_insert("support-atk13-victim", "victim")
    with (
        wire(judge_proxy.port, "support-atk13-squatter") as squatter,
        wire(judge_proxy.port, "support-atk13-victim") as victim,
    ):
        first = keyed_write(squatter, how, "k-atk13", victim_sql)
        assert not errors(first), messages(first)
        mine = keyed_write(victim, how, "k-atk13", victim_sql)
        assert not errors(mine), messages(mine)
        assert not any("replay" in m for m in messages(mine)), messages(mine)
        assert rows(mine) != rows(first)
        again = keyed_write(victim, how, "k-atk13", victim_sql)  # the victim's own retry
        assert rows(again) == rows(mine)
    got = log_rows_of(pg, "support-atk13-victim")
    assert len(got) == 2, got  # the squatter's copy and the victim's own, nothing more
    assert [[str(got[1][0])]] == rows(mine)


def budget_loop(port: int, how: str, agent_id: str, count: int) -> list[Msgs]:
    """``count`` writes of ``agent_id``, each under a fresh task name set ``how``."""
    sqls = [
        f"/* task='atk13-{how}-{i}' */ " + log_insert(agent_id, f"loop-{i}") for i in range(count)
    ]
    if how == "reconnect":
        out = []
        for i in range(count):
            with wire(port, agent_id, options=f"-c guard.task=atk13-r-{i}") as agent:
                out.append(agent.q(log_insert(agent_id, f"loop-{i}")))
        return out
    with wire(port, agent_id) as agent:
        if how == "comment":
            return [agent.q(sql) for sql in sqls]
        if how == "set":
            out = []
            for i in range(count):
                agent.ok(f"SET guard.task = 'atk13-set-{i}'")
                out.append(agent.q(log_insert(agent_id, f"loop-{i}")))
            return out
        if how == "no task":
            return [agent.q(log_insert(agent_id, f"loop-{i}")) for i in range(count)]
        if how == "one query":
            return [agent.q("; ".join(sqls))]
        if how == "parse pipeline":
            agent.send(*(m for sql in sqls for m in (parse(b"", sql), bind(), execute())), SYNC)
            return [agent.until(b"Z")]
        if how == "rebind":  # parsed once, bound again under each fresh task
            agent.send(parse(b"w", log_insert(agent_id, "rebind")), SYNC)
            out = [agent.until(b"Z")]
            for i in range(count):
                agent.ok(f"SET guard.task = 'atk13-rebind-{i}'")
                agent.send(bind(b"", b"w"), execute(), SYNC)
                out.append(agent.until(b"Z"))
            return out
        if how == "transaction":
            out = [agent.q("BEGIN")]
            out += [agent.q(sql) for sql in sqls]
            out.append(agent.q("COMMIT"))
            return out
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "comment",
        "set",
        "reconnect",
        "no task",
        "one query",
        "parse pipeline",
        "rebind",
        "transaction",
    ],
)
def test_a_loop_over_fresh_task_names_is_stopped_by_the_agents_budget(
    fresh: PgCluster, judge_proxy: ShopProxy, how: str
) -> None:
    """per_agent.max_statements is 5: whatever the task names, and however the writes
    are sent, no more than five rows land, and the budget table says so."""
    pg = fresh
    agent_id = f"support-atk13-loop-{how.replace(' ', '-')}"
    budget_loop(judge_proxy.port, how, agent_id, 8)
    landed = log_rows_of(pg, agent_id)
    assert len(landed) <= 5, landed
    used = su(
        pg,
        "SELECT coalesce(sum(statements), 0) FROM guardproxy.budget_usage "
        "WHERE scope = 'per_agent' AND subject = %s",
        agent_id,
    )[0][0]
    assert used == len(landed), (used, landed)
    with wire(judge_proxy.port, "support-atk13-other") as other:  # another agent still writes
        assert not errors(other.q(log_insert("support-atk13-other", "after")))


def test_many_agents_of_one_type_are_stopped_by_the_types_budget(
    fresh: PgCluster, judge_proxy: ShopProxy
) -> None:
    """per_agent_type.max_statements is 8: four agents of three writes each (each
    within its own budget of five) land at most eight rows together."""
    pg = fresh
    agents = [f"support-atk13-t{i}" for i in range(4)]
    for agent_id in agents:
        budget_loop(judge_proxy.port, "comment", agent_id, 3)
    landed = sum(len(log_rows_of(pg, a)) for a in agents)
    assert landed <= 8, landed
    used = su(
        pg,
        "SELECT coalesce(sum(statements), 0) FROM guardproxy.budget_usage "
        "WHERE scope = 'per_agent_type' AND subject = 'support'",
    )[0][0]
    assert used == landed


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM orders WHERE id <= {n}",
        "DELETE FROM orders o USING customers c WHERE o.customer_id = c.id AND o.id <= {n}",
        "UPDATE orders SET fulfillment_status = 'returned' WHERE id <= {n}",
        "UPDATE orders o SET fulfillment_status = 'returned' FROM customers c "
        "WHERE o.customer_id = c.id AND o.id <= {n}",
        "INSERT INTO order_state_log (order_id, previous_status, new_status, changed_by, "
        "reason) SELECT id, 'a', 'b', 'support-atk13-rows', 'rows' FROM orders WHERE id <= {n}",
    ],
)
def test_a_task_budget_counts_the_rows_a_write_changed(
    fresh: PgCluster, judge_proxy: ShopProxy, sql: str
) -> None:
    """max_writes_per_task is 3 rows: a write of four rows under a fresh task is undone
    whole (soft deletes, joins and INSERT ... SELECT included), one of three runs and the
    budget table says three."""
    pg = fresh
    before = su(pg, "SELECT id, fulfillment_status, deleted_at FROM orders ORDER BY id")
    with wire(judge_proxy.port, "support-atk13-rows") as agent:
        agent.ok("SET guard.task = 'atk13-rows-4'")
        got = agent.q(sql.format(n=4))
        assert errors(got), messages(got)
        assert su(pg, "SELECT id, fulfillment_status, deleted_at FROM orders ORDER BY id") == before
        assert log_rows_of(pg, "support-atk13-rows") == []
        agent.ok("SET guard.task = 'atk13-rows-3'")
        agent.ok(sql.format(n=3))
    used = su(
        pg, "SELECT task, rows_written FROM guardproxy.task_budgets WHERE task LIKE 'atk13-rows-%'"
    )
    assert [(t, int(n)) for t, n in used if n] == [("atk13-rows-3", 3)], used


@pytest.mark.parametrize("how", ["simple", "extended same text", "sql prepared"])
def test_a_derived_key_never_swallows_a_deliberate_repeat(
    fresh: PgCluster, judge_proxy: ShopProxy, how: str
) -> None:
    """packed, pending, packed in one task without a step: three writes, the order ends
    packed (a swallowed third write would leave it pending)."""
    pg = fresh
    values = ("packed", "pending", "packed")
    update = "UPDATE orders SET fulfillment_status = '{}' WHERE id = 4"
    with wire(judge_proxy.port, "support-atk13-repeat") as agent:
        agent.ok("SET guard.task = 'atk13-repeat'")
        if how == "simple":
            for v in values:
                assert not errors(agent.q(update.format(v)))
        elif how == "extended same text":
            for v in values:
                agent.send(
                    codec.message(
                        b"P",
                        b"\x00UPDATE orders SET fulfillment_status = $1 WHERE id = 4\x00"
                        + struct.pack("!h", 0),
                    ),
                    codec.message(
                        b"B",
                        b"\x00\x00"
                        + struct.pack("!hh", 0, 1)
                        + struct.pack("!i", len(v))
                        + v.encode()
                        + struct.pack("!h", 0),
                    ),
                    execute(),
                    SYNC,
                )
                got = agent.until(b"Z")
                assert not errors(got), messages(got)
        else:
            agent.ok("PREPARE u(text) AS UPDATE orders SET fulfillment_status = $1 WHERE id = 4")
            for v in values:
                assert not errors(agent.q(f"EXECUTE u('{v}')"))
        assert not any("replay" in m for m in messages(agent.q("SELECT 1")))
    assert su(pg, "SELECT fulfillment_status FROM orders WHERE id = 4")[0][0] == "packed"


# The forms of an INSERT whose foreign key points at a soft-deleted order (6, deleted
# before the test): each must be refused and write nothing.
CHILD_OF_DELETED = {
    "values": log_insert("support-atk13-child", "child"),
    "text literal": log_insert("support-atk13-child", "child", "'6'"),
    "expression": log_insert("support-atk13-child", "child", "5 + 1"),
    "scalar subquery": log_insert("support-atk13-child", "child", "(SELECT 6)"),
    "multi-row, one live": (
        f"INSERT INTO order_state_log {LOG_COLUMNS} VALUES "
        "(2, 'a', 'b', 'support-atk13-child', 'child', NULL), "
        "(6, 'a', 'b', 'support-atk13-child', 'child', NULL)"
    ),
    "select from values": (
        f"INSERT INTO order_state_log {LOG_COLUMNS} SELECT x, 'a', 'b', "
        "'support-atk13-child', 'child', NULL FROM (VALUES (6)) v(x)"
    ),
    "select from a series": (
        f"INSERT INTO order_state_log {LOG_COLUMNS} SELECT g, 'a', 'b', "
        "'support-atk13-child', 'child', NULL FROM generate_series(6, 6) g"
    ),
    "select unnest": (
        f"INSERT INTO order_state_log {LOG_COLUMNS} SELECT unnest(ARRAY[6]), 'a', 'b', "
        "'support-atk13-child', 'child', NULL"
    ),
    "cte source": (
        f"WITH v(x) AS (VALUES (6)) INSERT INTO order_state_log {LOG_COLUMNS} "
        "SELECT x, 'a', 'b', 'support-atk13-child', 'child', NULL FROM v"
    ),
    "on conflict do nothing": log_insert("support-atk13-child", "child").replace(
        " RETURNING id", " ON CONFLICT DO NOTHING"
    ),
    "union source": (
        f"INSERT INTO order_state_log {LOG_COLUMNS} SELECT 6, 'a', 'b', "
        "'support-atk13-child', 'child', NULL UNION ALL SELECT 6, 'a', 'b', "
        "'support-atk13-child', 'child', NULL"
    ),
    "column order swapped": (
        "INSERT INTO order_state_log (reason, changed_by, new_status, previous_status, "
        "order_id) VALUES ('child', 'support-atk13-child', 'b', 'a', 6)"
    ),
}


@pytest.mark.parametrize("form", sorted(CHILD_OF_DELETED))
def test_a_child_row_of_a_soft_deleted_order_is_refused(
    fresh: PgCluster, judge_proxy: ShopProxy, form: str
) -> None:
    pg = fresh
    su(
        pg,
        "UPDATE orders SET deleted_at = now(), deleted_by = 'support-atk13-setup' WHERE id = 6",
    )
    with wire(judge_proxy.port, "support-atk13-child") as agent:
        got = agent.q(CHILD_OF_DELETED[form].replace("VALUES (2,", "VALUES (6,", 1))
        assert errors(got), form
        agent.ok("SELECT 1")
    assert log_rows_of(pg, "support-atk13-child") == []


@pytest.mark.parametrize("how", ["prepared before", "extended parameter", "copy"])
def test_a_child_row_of_a_soft_deleted_order_is_refused_on_every_path(
    fresh: PgCluster, judge_proxy: ShopProxy, how: str
) -> None:
    pg = fresh
    who = "support-atk13-child"
    with wire(judge_proxy.port, who) as agent:
        if how == "prepared before":  # prepared while the order was live
            agent.ok(
                f"PREPARE c(bigint) AS INSERT INTO order_state_log {LOG_COLUMNS} "
                f"VALUES ($1, 'a', 'b', '{who}', 'child', NULL)"
            )
        su(pg, f"UPDATE orders SET deleted_at = now(), deleted_by = '{who}-setup' WHERE id = 6")
        if how == "prepared before":
            got = agent.q("EXECUTE c(6)")
        elif how == "extended parameter":
            sql = (
                f"INSERT INTO order_state_log {LOG_COLUMNS} "
                f"VALUES ($1::bigint, 'a', 'b', '{who}', 'child', NULL)"
            )
            agent.send(
                parse(b"", sql),
                codec.message(
                    b"B",
                    b"\x00\x00" + struct.pack("!hhi", 0, 1, 1) + b"6" + struct.pack("!h", 0),
                ),
                execute(),
                SYNC,
            )
            got = agent.until(b"Z")
        else:
            agent.send(
                query(
                    "COPY order_state_log (order_id, previous_status, new_status, changed_by, "
                    "reason) FROM STDIN"
                )
            )
            got = agent.until(b"G")
            agent.send(
                codec.message(b"d", f"6\ta\tb\t{who}\tchild\n".encode()),
                codec.message(b"c", b""),
            )
            got += agent.until(b"Z")
        assert errors(got), how
        agent.ok("SELECT 1")
    assert log_rows_of(pg, who) == []


# ================================================================ one agent cannot stall the others


def nested_subqueries(limit: int, salt: int) -> str:
    """The deepest ``SELECT id FROM (SELECT id FROM (...) s1) s0`` of at most ``limit``
    bytes: slow to analyse for its size (each level is a scope). ``salt`` makes each text
    distinct, so that no cache answers it."""
    depth, sql = 0, ""
    while True:
        inner = f"SELECT id FROM orders WHERE id = {salt}"
        for i in range(depth + 1):
            inner = f"SELECT id FROM ({inner}) s{i}"
        if len(inner) > limit:
            return sql
        depth, sql = depth + 1, inner


def victim_latency(port: int, attack: Any) -> float:
    """Seconds another agent waited for ``SELECT 1`` while ``attack()`` ran in a thread
    (bounded: a reply that has not come within WAIT is a hang, reported as WAIT)."""
    with wire(port, "analytics-atk13-victim") as victim:
        victim.ok("SELECT 1")  # connected and served before the attack
        worker = threading.Thread(target=attack, daemon=True)
        worker.start()
        time.sleep(0.3)  # the attack's messages are on their way
        start = time.monotonic()
        try:
            victim.q("SELECT 1", timeout=WAIT)
            waited = time.monotonic() - start
        except TimeoutError:
            waited = WAIT
        worker.join(90)
        return waited


def test_a_pipeline_of_slow_statements_under_the_offload_size_does_not_stall_others(
    fresh: PgCluster, judge_proxy: ShopProxy
) -> None:
    """Statements up to judge_offload_above (16 KB) are judged on the event loop that
    serves every agent; a deeply nested one takes about a second to analyse, and a
    pipeline of them (Parse messages before one Sync) is judged in one go: the victim's
    SELECT 1 gets no answer within the hang detector's WAIT."""
    # each of its own depth and literal: no cache of texts or of shapes answers them
    texts = [nested_subqueries(16000 - 40 * salt, salt) for salt in range(ATTACKS)]
    assert all(len(t) <= 16384 for t in texts)

    def attack() -> None:
        with wire(judge_proxy.port, "analytics-atk13-attacker") as attacker:
            attacker.send(*(parse(f"n{i}".encode(), t) for i, t in enumerate(texts)), SYNC)
            with contextlib.suppress(TimeoutError, ConnectionError):
                attacker.until(b"Z", timeout=90)

    waited = victim_latency(judge_proxy.port, attack)
    assert waited < WAIT, f"another agent's SELECT 1 waited {waited:.1f}s during the attack"


def test_one_slow_statement_sent_again_and_again_does_not_stall_others(
    fresh: PgCluster, judge_proxy: ShopProxy
) -> None:
    """The same slow statement (about a second of analysis) pipelined many times: judged
    once, the victim's SELECT 1 is answered within WAIT."""
    slow = nested_subqueries(16000, 7)

    def attack() -> None:
        with wire(judge_proxy.port, "analytics-atk13-attacker") as attacker:
            attacker.send(*(query(slow) for _ in range(ATTACKS)))
            with contextlib.suppress(TimeoutError, ConnectionError):
                attacker.until(b"Z", count=ATTACKS, timeout=90)

    waited = victim_latency(judge_proxy.port, attack)
    assert waited < WAIT, f"another agent's SELECT 1 waited {waited:.1f}s during the attack"


@pytest.mark.parametrize("kind", ["query", "parse"])
def test_a_message_near_the_protocol_limit_is_refused_without_stalling_others(
    fresh: PgCluster, judge_proxy: ShopProxy, kind: str
) -> None:
    """A 40 MB statement (max_statement_size is 1 MB, the message limit 64 MB), trickled
    in small writes: refused with 54000, the victim served meanwhile."""
    text = "SELECT 1 -- " + "z" * (40 << 20)
    message = query(text) if kind == "query" else parse(b"", text)
    replies: list[Msgs] = []

    def attack() -> None:
        with wire(judge_proxy.port, "analytics-atk13-huge") as attacker:
            for start in range(0, len(message), 1 << 16):
                attacker.sock.sendall(message[start : start + (1 << 16)])
            if kind == "parse":
                attacker.send(bind(), execute(), SYNC)
            replies.append(attacker.until(b"Z", timeout=60))
            replies.append(attacker.q("SELECT 1"))

    waited = victim_latency(judge_proxy.port, attack)
    assert waited < WAIT, f"another agent's SELECT 1 waited {waited:.1f}s during the attack"
    assert errors(replies[0])[:1] == ["54000"], messages(replies[0])
    assert not errors(replies[1])


def test_a_statement_at_the_size_limit_is_refused_without_stalling_others(
    fresh: PgCluster, judge_proxy: ShopProxy
) -> None:
    """A denied statement of about a megabyte (the issue's example) and one just past
    max_statement_size: refused, and the other agent is served meanwhile."""
    big_denied = (
        "SELECT email FROM customers WHERE name IN ("
        + ", ".join(f"'n{i}'" for i in range(90_000))
        + ")"
    )
    past = "SELECT 1 -- " + "x" * (1 << 20)
    replies: list[Msgs] = []

    def attack() -> None:
        with wire(judge_proxy.port, "analytics-atk13-attacker") as attacker:
            replies.append(attacker.q(big_denied, timeout=60))
            replies.append(attacker.q(past, timeout=60))
            replies.append(attacker.q("SELECT 1", timeout=60))

    waited = victim_latency(judge_proxy.port, attack)
    assert waited < WAIT, f"another agent's SELECT 1 waited {waited:.1f}s during the attack"
    assert [errors(r) for r in replies] == [["42501"], ["54000"], []], [
        messages(r) for r in replies
    ]
    assert not leaked(b"".join(raw for r in replies for _, raw in r))


def test_slow_large_statements_of_one_agent_do_not_hold_up_anothers(
    fresh: PgCluster, judge_proxy: ShopProxy
) -> None:
    """Statements over judge_offload_above go to the judge workers (one by default), and
    each may take judge_timeout (2 s) before it is refused. Six sessions of one agent
    send a 57 KB statement each (three
    nested chains, some seconds of analysis); another agent's ordinary 20 KB statement must
    still be answered (and allowed) within the hang detector's WAIT."""
    slow = [
        " UNION ALL ".join(f"({nested_subqueries(19_000 - 40 * i, 100 * i + k)})" for k in range(3))
        for i in range(6)
    ]
    attackers = [Wire(judge_proxy.port, f"analytics-atk13-big{i}") for i in range(6)]
    try:
        for conn, text in zip(attackers, slow, strict=True):
            conn.send(query(text))
        time.sleep(0.3)
        with wire(judge_proxy.port, "analytics-atk13-victim") as victim:
            big = "SELECT length('" + "v" * 20_000 + "')"
            start = time.monotonic()
            got = victim.q(big, timeout=60)  # bounded; judged against WAIT below
            waited = time.monotonic() - start
            print(f"victim waited {waited:.2f}s: {messages(got)}")
            assert waited < WAIT and rows(got) == [["20000"]], (waited, messages(got))
        for conn in attackers:
            with contextlib.suppress(TimeoutError, ConnectionError):
                print("attacker:", messages(conn.until(b"Z", timeout=60)))
    finally:
        for conn in attackers:
            conn.close()


# ================================================================ the proxy's own SQL

HOSTILE_REASONS = [
    "x'); UPDATE orders SET fulfillment_status = 'returned'; --",
    "$$ $guard$ $a$ \\ end",
    "*/ UPDATE orders SET fulfillment_status = 'returned' /*",
    "E'\\x27' || chr(39)",
    "é ☃ line %27 %s",
]


@pytest.mark.parametrize("how", ["comment", "set"])
@pytest.mark.parametrize("reason", HOSTILE_REASONS)
def test_a_hostile_soft_delete_reason_is_kept_as_data(
    fresh: PgCluster, judge_proxy: ShopProxy, reason: str, how: str
) -> None:
    """The reason tag goes into the soft-delete rewrite (orders.delete_reason and the
    image in guardproxy.deleted_rows): it must land byte for byte, and nothing else may
    change."""
    pg = fresh
    who = "support-atk13-reason"
    before = su(pg, "SELECT id, fulfillment_status FROM orders ORDER BY id")
    with wire(judge_proxy.port, who) as agent:
        delete = "DELETE FROM orders WHERE id = 6"
        if how == "comment":
            got = agent.q(f"/* reason='{url_quote(reason, safe='')}' */ {delete}")
        else:
            agent.ok("SET guard.reason = '" + reason.replace("'", "''") + "'")
            got = agent.q(delete)
        assert not errors(got), messages(got)
    assert su(pg, "SELECT id, fulfillment_status FROM orders ORDER BY id") == before
    assert su(pg, "SELECT delete_reason, deleted_by FROM orders WHERE id = 6") == [(reason, who)]
    assert su(pg, "SELECT reason FROM guardproxy.deleted_rows WHERE agent_id = %s", who) == [
        (reason,)
    ]
