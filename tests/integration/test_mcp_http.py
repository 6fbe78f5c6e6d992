"""`guardproxy mcp http` with the MCP SDK's own client and raw HTTP, against a real proxy.

One MCP HTTP server (a subprocess, as it is deployed) in front of one proxy for the
module, with a token per example agent and one for an agent no policy lists. The
server runs with small result bounds and one call at a time per agent, so that
those limits can be seen. Security checks look at the effect: the shop's rows
(`shop.snapshot`), backends left in Postgres, what a refused request was told.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import psycopg
import pytest
import shop
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from pgcluster import free_port, wait_for_port
from prometheus_client.parser import text_string_to_metric_families
from shop import POLICIES, ROOT, SECRETS, SHOP_DB, ShopProxy, launch_proxy, snapshot
from typer.testing import CliRunner

from guardproxy import cli
from guardproxy.mcp.tokens import new_token, token_hash

DOC = ROOT / "docs" / "mcp.md"


def doc_blocks(language: str) -> list[str]:
    """The fenced code blocks of docs/mcp.md whose fence names `language` ("" for none)."""
    blocks: list[str] = []
    fence: str | None = None
    lines: list[str] = []
    for line in DOC.read_text().splitlines():
        if line.startswith("```") and fence is None:
            fence, lines = line[3:].strip(), []
        elif line.startswith("```"):
            if fence == language:
                blocks.append("\n".join(lines) + "\n")
            fence = None
        elif fence is not None:
            lines.append(line)
    return blocks


pytestmark = pytest.mark.timeout(60)

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline
AGENTS = ("analytics-1", "support-1", "fulfillment-1", "nobody-1")
INIT = {
    "protocolVersion": "2025-06-18",
    "capabilities": {},
    "clientInfo": {"name": "raw-test", "version": "0"},
}
JSON_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@dataclass
class McpHttp:
    port: int
    metrics_port: int
    tokens: dict[str, str]
    tokens_file: Path
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx2.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


@pytest.fixture(scope="module")
def proxy(shop_db, tmp_path_factory) -> Iterator[ShopProxy]:
    with launch_proxy(shop_db, tmp_path_factory.mktemp("mcp-http") / "guardproxy.log") as handle:
        yield handle


@pytest.fixture(scope="module")
def server(proxy, tmp_path_factory) -> Iterator[McpHttp]:
    work = tmp_path_factory.mktemp("mcp-http-server")
    tokens_file = work / "tokens"
    tokens = {agent: new_token(tokens_file, agent) for agent in AGENTS}
    port, metrics_port = free_port(), free_port()
    args = [sys.executable, "-m", "guardproxy", "mcp", "http", "--tokens-file", str(tokens_file)]
    args += ["--port", str(port), "--metrics-port", str(metrics_port)]
    args += ["--proxy", f"postgresql://127.0.0.1:{proxy.port}/{SHOP_DB}"]
    args += ["--policies", str(POLICIES), "--max-calls-per-agent", "1"]
    args += ["--max-rows", "50", "--max-bytes", "8192", "--max-cell-chars", "200"]
    log_path = work / "mcp.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    handle = McpHttp(port, metrics_port, tokens, tokens_file, proc, log_path)
    try:
        wait_for_port("127.0.0.1", port, timeout=30)
        yield handle
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.fixture(autouse=True)
def _each_test(request, proxy, server, shop_db, shop_baseline) -> Iterator[None]:
    since, mcp_since = len(proxy.log()), len(server.log())
    yield
    shop.dump_log_on_failure(request, proxy, since)
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"\n----- guardproxy mcp http log -----\n{server.log()[mcp_since:][-4000:]}")
    if snapshot(shop_db) != shop_baseline:
        shop.restore_shop(shop_db)


@contextlib.asynccontextmanager
async def connect(server: McpHttp, agent: str, mode: str = "auto") -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {server.tokens[agent]}"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        transport = streamable_http_client(server.url, http_client=http)
        async with Client(transport, mode=mode, read_timeout_seconds=30) as client:
            yield client


async def call(client: Client, tool: str, **arguments: Any) -> tuple[bool, str, Any]:
    result = await client.call_tool(tool, arguments)
    text = "".join(getattr(block, "text", "") for block in result.content)
    return bool(result.is_error), text, result.structured_content


async def ok(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    is_error, text, data = await call(client, tool, **arguments)
    assert not is_error, text
    return dict(data)


async def refused(client: Client, tool: str, **arguments: Any) -> str:
    is_error, text, _ = await call(client, tool, **arguments)
    assert is_error, f"expected a tool error, got {text}"
    return text


def post(server: McpHttp, body: Any, headers: dict[str, str] | None = None, **kw: Any) -> Any:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx2.post(
        server.url, content=content, headers={**JSON_HEADERS, **(headers or {})}, timeout=30, **kw
    )


def bearer(server: McpHttp, agent: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.tokens[agent]}"}


# ---------------------------------------------------------------- the endpoint's doors


def test_the_tokens_file_keeps_hashes_only(server) -> None:
    text = server.tokens_file.read_text()
    for agent, token in server.tokens.items():
        assert token not in text
        assert f"{agent}:sha256:{token_hash(token)}" in text


def test_no_token_or_an_unknown_one_is_401(server) -> None:
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT}
    for headers in ({}, {"Authorization": "Bearer gpmcp_not-a-token"}, {"Authorization": "x"}):
        reply = post(server, initialize, headers)
        assert reply.status_code == 401, reply.text
        assert reply.headers["www-authenticate"].startswith("Bearer")
    known = post(server, initialize, bearer(server, "analytics-1"))
    assert known.status_code == 200, known.text


def test_an_agent_no_policy_lists_is_refused(server) -> None:
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT}
    reply = post(server, initialize, bearer(server, "nobody-1"))
    assert reply.status_code == 403
    assert "matches no agent type" in reply.json()["error"]


def test_host_and_origin_are_checked_before_anything_else(server) -> None:
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT}
    auth = bearer(server, "analytics-1")
    for headers in ({"Host": "evil.example"}, {"Host": "evil.example", **auth}):
        assert post(server, initialize, headers).status_code == 421
    for origin in ("http://evil.example", "http://127.0.0.1.evil.example:80", "null"):
        assert post(server, initialize, {"Origin": origin, **auth}).status_code == 403
        assert post(server, initialize, {"Origin": origin}).status_code == 403
    allowed = post(server, initialize, {"Origin": f"http://localhost:{server.port}", **auth})
    assert allowed.status_code == 200


def test_malformed_json_rpc_and_oversized_bodies_are_refused(server, shop_db) -> None:
    before = snapshot(shop_db)
    auth = bearer(server, "support-1")
    garbage = post(server, b'{"jsonrpc": "2.0", "id": 1, "method": "initia', auth)
    assert garbage.status_code == 400
    assert garbage.json()["error"]["code"] == -32700
    huge_sql = "delete from orders where id = 1 -- " + "x" * (1024 * 1024)
    call_body = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "query", "arguments": {"sql": huge_sql}},
    }
    assert post(server, call_body, auth).status_code == 413
    not_json = post(server, b"select 1", {**auth, "Content-Type": "text/plain"})
    assert not_json.status_code in (400, 415)
    assert snapshot(shop_db) == before


def test_a_session_serves_only_the_token_that_opened_it(server) -> None:
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT}
    opened = post(server, initialize, bearer(server, "analytics-1"))
    session = opened.headers["mcp-session-id"]
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}
    headers = {"Mcp-Session-Id": session, "Mcp-Protocol-Version": "2025-06-18"}
    stolen = post(server, listing, {**headers, **bearer(server, "support-1")})
    assert stolen.status_code == 404


# ---------------------------------------------------------------- tools over HTTP


async def test_each_agent_type_gets_its_own_tools_and_reads_work(server, shop_db) -> None:
    async with connect(server, "analytics-1") as analytics:
        a_tools = {t.name: t for t in (await analytics.list_tools()).tools}
        a_described = await ok(analytics, "describe")
        rows = await ok(analytics, "query", sql="SELECT id FROM orders ORDER BY id")
    comment = "COMMENT ON COLUMN orders.fulfillment_status IS {}"
    shop_db.psql(comment.format("'where the order is'"), dbname=SHOP_DB)
    try:
        async with connect(server, "support-1") as support:
            s_tools = {t.name: t for t in (await support.list_tools()).tools}
            s_described = await ok(support, "describe")
    finally:
        shop_db.psql(comment.format("NULL"), dbname=SHOP_DB)
    assert "read-only" in (a_tools["query"].description or "")
    assert "deletes are soft" not in (a_tools["query"].description or "")
    assert [t["table"] for t in a_described["tables"]] == ["customers", "orders"]
    assert "payments" not in json.dumps(a_described)
    assert [r[0] for r in rows["rows"]] == [1, 2, 3, 4, 5, 6]
    text = s_tools["query"].description or ""
    assert "deletes are soft" in text and "runs once" in text
    assert s_tools["query"].annotations and s_tools["query"].annotations.destructive_hint is True
    orders = next(t for t in s_described["tables"] if t["table"] == "orders")
    status = next(c for c in orders["columns"] if c["name"] == "fulfillment_status")
    assert status["write"] == ["update"] and status["comment"] == "where the order is"
    assert s_described["functions"].startswith("built-in functions (pg_catalog), except")
    deleted_at = next(c for c in orders["columns"] if c["name"] == "deleted_at")
    assert "write" not in deleted_at  # only guardproxy's rewrite of DELETE sets it
    assert any("marks rows deleted" in rule for rule in orders["rules"])
    assert any("more than 100 rows" in rule for rule in orders["rules"])
    assert "payments" not in json.dumps(s_described)


async def test_the_http_config_of_the_docs_works(server) -> None:
    config = json.loads(doc_blocks("json")[1])["mcpServers"]["shop-db"]
    url = config["url"].replace("127.0.0.1:8808", f"127.0.0.1:{server.port}")
    headers = {
        name: value.replace("gpmcp_REPLACE_WITH_THE_TOKEN", server.tokens["analytics-1"])
        for name, value in config["headers"].items()
    }
    assert config["type"] == "http"
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        described = await ok(client, "describe")
    assert described["agent"] == "analytics-1"


def test_the_token_command_of_the_docs(tmp_path) -> None:
    command = doc_blocks("sh")[0].splitlines()[0].split()
    assert command[:4] == ["guardproxy", "mcp", "token", "analytics-7"]
    tokens_file = tmp_path / "mcp.tokens"
    out = CliRunner().invoke(cli.app, [*command[1:4], "--tokens-file", str(tokens_file)])
    assert out.exit_code == 0, out.output
    token = out.stdout.strip()
    assert token.startswith("gpmcp_") and len(token) > 40
    assert tokens_file.read_text() == f"analytics-7:sha256:{token_hash(token)}\n"
    assert oct(tokens_file.stat().st_mode & 0o777) == "0o600"


async def test_the_task_tool_holds_per_mcp_session(server, shop_db) -> None:
    async with connect(server, "support-1", mode="legacy") as first:
        opened = await ok(first, "task", task="http-task-1", step="a")
        deleted = await ok(first, "query", sql="DELETE FROM orders WHERE id = 6")
    async with connect(server, "support-1", mode="legacy") as second:
        other = await ok(second, "query", sql="SELECT count(*) AS n FROM orders")
    assert opened["applies_to"] == "this MCP session"
    assert deleted["task"] == "http-task-1" and deleted["step"] == "a"
    assert other["task"] is None  # another session has its own task
    assert (
        shop_db.psql("select task || '|' || step from guardproxy.deleted_rows", dbname=SHOP_DB)
        == "http-task-1|a"
    )


async def test_an_idempotency_key_makes_a_retried_write_run_once(server, shop_db) -> None:
    update = "UPDATE orders SET tracking_number = $1 WHERE id = 3 RETURNING tracking_number"
    async with connect(server, "fulfillment-1") as client:  # idempotency: explicit
        first = await ok(client, "query", sql=update, params=["TRK-9"], idempotency_key="ship-3")
        retry = await ok(client, "query", sql=update, params=["TRK-9"], idempotency_key="ship-3")
        other = await refused(
            client, "query", sql=update, params=["TRK-10"], idempotency_key="ship-3"
        )
    assert first["rows"] == retry["rows"] == [["TRK-9"]]
    assert any("replayed" in notice for notice in retry["notices"])
    # the same key with other parameters is refused, and nothing runs
    assert "ERROR [22023]: idempotency key 'ship-3' was already used" in other
    tracking = shop_db.psql("select tracking_number from orders where id = 3", dbname=SHOP_DB)
    assert tracking == "TRK-9"


BYPASSES = [
    ("analytics-1", "select 1; delete from orders", "one statement per call"),
    ("analytics-1", "commit; delete from orders where id = 1", "one statement per call"),
    ("support-1", "commit; drop table payments", "one statement per call"),
    ("support-1", "rollback; delete from orders where id > 0", "one statement per call"),
    ("support-1", "update orders set fulfillment_status = 'x' where id = 3; delete from orders", "one"),
    ("analytics-1", "end", "COMMIT is not used here"),
    ("analytics-1", "start transaction read write", "is not used here"),
    ("analytics-1", "set default_transaction_read_only = off", "ERROR [42501]"),
    ("analytics-1", "with d as (delete from orders where id = 6 returning id) select * from d", "42501"),
    ("support-1", "with d as (delete from orders where id = 5 returning id) select * from d", "42501"),
    ("support-1", "with u as (update orders set fulfillment_status = 'x' where id = 4 returning id) select * from u", "42501"),
    ("analytics-1", "explain analyze delete from orders where id = 6", "ERROR [42501]"),
    ("analytics-1", "select * from pg_read_file('/etc/passwd')", "pg_read_file"),
    ("support-1", "select nextval('orders_id_seq')", "nextval"),
    ("support-1", "select pg_sleep(0.1)", "pg_sleep"),
    ("support-1", "select pg_terminate_backend(pid) from pg_stat_activity", "42501"),
    ("support-1", "do $$ begin delete from orders; end $$", "ERROR [42501]"),
    ("support-1", "delete from orders", "require_where"),
    ("fulfillment-1", "select lo_import('/etc/passwd')", "lo_import"),
    ("analytics-1", "select card_last4 from payments", "payments"),
    ("analytics-1", "select email from customers", "email"),
]  # fmt: skip


@pytest.mark.parametrize(("agent", "sql", "expected"), BYPASSES)
async def test_bypass_classes_over_http_change_nothing(
    server, shop_db, agent, sql, expected
) -> None:
    before = snapshot(shop_db)
    async with connect(server, agent) as client:
        text = await refused(client, "query", sql=sql)
        after_refusal = await ok(client, "query", sql="SELECT count(*) AS n FROM orders")
    assert expected in text, text
    assert snapshot(shop_db) == before
    assert after_refusal["rows"] == [[6]]
    for secret in SECRETS:
        assert secret not in text


async def test_explain_gives_the_decision_and_the_plan_without_running(server, shop_db) -> None:
    before = snapshot(shop_db)
    async with connect(server, "support-1") as client:
        soft = await ok(client, "explain", sql="DELETE FROM orders WHERE id = $1", params=[6])
        denied = await ok(client, "explain", sql="SELECT amount FROM payments")
        analyze = await ok(client, "explain", sql="EXPLAIN ANALYZE DELETE FROM orders")
        capped = await ok(client, "explain", sql="UPDATE orders SET fulfillment_status = 'x'")
    assert snapshot(shop_db) == before  # nothing ran
    assert soft["decision"] == "rewrite" and soft["rule"] == "tables.orders.soft_delete"
    assert soft["sql_sent"].startswith("WITH guardproxy_deleted AS (UPDATE orders SET deleted_at")
    assert soft["plan"]["total_cost"] > 0 and soft["plan"]["rows"] >= 1
    assert "not run" in soft["plan_note"]
    assert denied["decision"] == "deny" and denied["rule"] == "tables"
    assert "payments" in denied["reason"] and denied["hint"] and denied["plan"] is None
    assert analyze["decision"] == "deny" and analyze["plan"] is None
    assert capped["decision"] == "deny" and capped["rule"] == "require_where"


async def test_bad_arguments_are_tool_errors_and_run_nothing(server, shop_db) -> None:
    before = snapshot(shop_db)
    async with connect(server, "support-1") as client:
        unknown = await client.call_tool("drop_everything", {"sql": "drop table orders"})
        not_text = await refused(client, "query", sql=5)
        a_list = await refused(client, "query", sql=["delete from orders where id = 1"])
        huge = await refused(client, "query", sql="select 1 " + "-" * 100_001)
        many = await refused(client, "query", sql="select $1", params=list(range(101)))
        nested = await refused(client, "query", sql="select $1", params=[{"a": 1}])
        control = await refused(client, "task", task="T\n1")
        empty = await refused(client, "query", sql="-- nothing")
        syntax = await refused(client, "query", sql="selec 1")
        copy = await refused(client, "query", sql="copy orders to stdout")
        wrong_type = await refused(
            client, "query", sql="select id from orders where id = $1", params=["x"]
        )
    assert unknown.is_error
    assert "Unknown tool: drop_everything" in "".join(
        getattr(b, "text", "") for b in unknown.content
    )
    assert "valid string" in not_text and "valid string" in a_list
    assert "at most 100000 characters" in huge
    assert "at most 100 items" in many
    assert "params.0" in nested
    assert "pattern" in control
    assert "no statement" in empty
    assert "ERROR [42601]" in syntax and "HINT: fix the SQL syntax" in syntax
    assert "COPY is not available" in copy
    assert 'ERROR [22P02]: invalid input syntax for type bigint: "x"' in wrong_type
    assert snapshot(shop_db) == before


async def test_too_large_results_are_cut_and_every_cut_is_said(server) -> None:
    """The server runs with --max-rows 50 --max-bytes 8192 --max-cell-chars 200."""
    async with connect(server, "support-1") as client:
        rows = await ok(client, "query", sql="SELECT g FROM generate_series(1, 1000000) g")
        fewer = await ok(client, "query", sql="SELECT id FROM orders ORDER BY id", max_rows=2)
        cell = await ok(client, "query", sql="SELECT repeat('x', 300) AS long, 'short' AS s")
        wide = await ok(client, "query", sql="SELECT repeat('z', 190) FROM generate_series(1, 500)")
        written = await ok(
            client,
            "query",
            sql="UPDATE orders SET fulfillment_status = fulfillment_status WHERE id < 6 RETURNING id",
            max_rows=3,
        )
    assert rows["rows"] == [[g] for g in range(1, 51)] and rows["complete"] is False
    assert rows["cuts"][0].startswith(
        "only the first 50 rows are shown; the statement returned more"
    )
    assert fewer["rows"] == [[1], [2]] and "first 2 rows" in fewer["cuts"][0]
    assert cell["rows"][0][0] == "x" * 200 + "…" and cell["rows"][0][1] == "short"
    assert "1 cell(s) were cut to 200 characters" in cell["cuts"][0]
    assert "row 1 column 'long'" in cell["cuts"][0]
    assert wide["complete"] is False and 0 < len(wide["rows"]) < 50
    assert any("passed 8192 bytes" in cut for cut in wide["cuts"])
    assert written["command"] == "UPDATE 5" and len(written["rows"]) == 3
    assert written["cuts"] == ["only the first 3 of 5 rows are shown (at most 3 rows per result)"]


# ---------------------------------------------------------------- limits and lifetimes


@contextlib.contextmanager
def locked(pg, statement: str) -> Iterator[None]:
    """Holds a lock as superuser (`statement` in an open transaction), so agents wait on it."""
    with psycopg.connect(pg.dsn("postgres", dbname=SHOP_DB)) as conn:
        conn.execute(statement)
        yield
        conn.rollback()


def row_locked(pg, order_id: int) -> contextlib.AbstractContextManager[None]:
    return locked(pg, f"SELECT id FROM orders WHERE id = {order_id} FOR UPDATE")


def waiting_backends(pg) -> int:
    """Sessions the proxy opened that wait on a lock."""
    return int(
        pg.psql(
            "select count(*) from pg_stat_activity where usename = 'app_owner' "
            "and datname = 'shop' and wait_event_type = 'Lock'",
            dbname=SHOP_DB,
        )
    )


def open_transactions(pg) -> int:
    """Sessions the proxy opened that sit in a transaction or still run a statement."""
    return int(
        pg.psql(
            "select count(*) from pg_stat_activity where usename = 'app_owner' "
            "and datname = 'shop' and (state like 'idle in transaction%' or "
            "(state = 'active' and pid <> pg_backend_pid()))",
            dbname=SHOP_DB,
        )
    )


async def wait_for(predicate: Any, what: str, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await anyio.sleep(0.05)


async def test_calls_per_agent_are_limited_while_others_go_on(server, shop_db) -> None:
    results: dict[str, Any] = {}

    async def blocked_update() -> None:
        async with connect(server, "support-1") as client:
            results["first"] = await call(
                client, "query", sql="UPDATE orders SET fulfillment_status = 'packed' WHERE id = 4"
            )

    in_flight = (
        "guardproxy_mcp_calls_in_flight",
        (("agent", "support-1"), ("agent_type", "support"), ("transport", "http")),
    )
    async with anyio.create_task_group() as tg:
        with row_locked(shop_db, 4):
            tg.start_soon(blocked_update)
            await wait_for(lambda: waiting_backends(shop_db) == 1, "the update to wait")
            async with connect(server, "support-1") as support:
                second = await refused(support, "query", sql="SELECT 1")
            async with connect(server, "analytics-1") as analytics:
                other = await ok(analytics, "query", sql="SELECT count(*) FROM orders")
            running = server.metrics()[in_flight]
        # the lock is gone: the first call finishes, and the task group waits for it
    assert "already has 1 calls running" in second and "Nothing was run" in second
    assert other["rows"] == [[6]]
    assert running == 1
    is_error, text, _ = results["first"]
    assert not is_error and '"UPDATE 1"' in text


async def vanish_during(server: McpHttp, agent: str, sql: str, pg, mode: str = "auto") -> None:
    """Calls `query` and goes away (closes its HTTP connection) while the call waits."""

    async def call_then_vanish() -> None:
        async with connect(server, agent, mode) as client:
            await client.call_tool("query", {"sql": sql})

    async with anyio.create_task_group() as tg:
        tg.start_soon(call_then_vanish)
        await wait_for(lambda: waiting_backends(pg) == 1, "the call to wait on the lock")
        tg.cancel_scope.cancel()


async def test_a_dropped_http_client_is_cancelled_and_leaves_no_transaction_open(
    server, shop_db
) -> None:
    """A read runs in a transaction of its own (a cursor). Its client goes away while
    it waits on a lock: the MCP server cancels it at the proxy (the lock is still
    held, so only the cancel can end it) and closes the session."""
    with locked(shop_db, "LOCK TABLE orders IN ACCESS EXCLUSIVE MODE"):
        await vanish_during(server, "analytics-1", "SELECT count(*) FROM orders", shop_db)
        await wait_for(lambda: waiting_backends(shop_db) == 0, "the read to be cancelled", 3)
        await wait_for(lambda: open_transactions(shop_db) == 0, "no transaction left open")
    async with connect(server, "analytics-1") as client:  # the agent goes on
        assert (await ok(client, "query", sql="SELECT count(*) FROM orders"))["rows"] == [[6]]


async def test_a_dropped_client_of_an_mcp_session_leaves_no_transaction_open(
    server, shop_db
) -> None:
    """With an MCP session (the handshake protocol versions) the SDK does not cancel a
    call whose client went away: the call runs to its end (here: once the lock is
    released), and its session closes with it."""
    with locked(shop_db, "LOCK TABLE orders IN ACCESS EXCLUSIVE MODE"):
        await vanish_during(
            server, "analytics-1", "SELECT count(*) FROM orders", shop_db, mode="legacy"
        )
    await wait_for(lambda: waiting_backends(shop_db) == 0, "the read to end")
    await wait_for(lambda: open_transactions(shop_db) == 0, "no transaction left open")


async def test_a_write_whose_client_vanished_leaves_no_transaction_open(server, shop_db) -> None:
    """The MCP server cancels the abandoned write at the proxy too; the proxy does not
    yet stop a managed write on a cancel request (see the xfail test below), so the
    write waits for the lock and then ends, leaving nothing open."""
    with row_locked(shop_db, 3):
        await vanish_during(
            server,
            "support-1",
            "UPDATE orders SET fulfillment_status = 'returned' WHERE id = 3",
            shop_db,
        )
    await wait_for(lambda: open_transactions(shop_db) == 0, "no transaction left open", 15)
    assert waiting_backends(shop_db) == 0


def test_a_cancel_request_stops_a_managed_write(proxy, shop_db) -> None:
    """Plain psycopg, no MCP: what the MCP server relies on to stop an abandoned write."""
    options = "-c statement_timeout=3s"  # a lower timeout than the policy's, to fail sooner
    with (
        row_locked(shop_db, 3),
        psycopg.connect(proxy.dsn("support-1"), autocommit=True, options=options) as c,
    ):
        started = time.monotonic()
        canceller = threading.Timer(0.5, c.cancel_safe)
        canceller.start()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled) as exc:
                c.execute("UPDATE orders SET fulfillment_status = 'returned' WHERE id = 3")
        finally:
            canceller.join()
        waited = time.monotonic() - started
    assert "user request" in str(exc.value), f"{exc.value} after {waited:.1f}s"


async def test_metrics_label_each_agent_and_the_transport(server) -> None:
    async with connect(server, "fulfillment-1") as client:
        await ok(client, "query", sql="SELECT id FROM orders WHERE id = 1")
        await refused(client, "query", sql="DELETE FROM orders WHERE id = 1")
    samples = server.metrics()
    labels = (("agent", "fulfillment-1"), ("agent_type", "fulfillment"), ("transport", "http"))

    def calls(outcome: str) -> float:
        key = tuple(sorted((*labels, ("tool", "query"), ("outcome", outcome))))
        return samples.get(("guardproxy_mcp_tool_calls_total", key), 0.0)

    assert calls("ok") >= 1 and calls("denied") >= 1
    duration = ("guardproxy_mcp_tool_duration_seconds_count", tuple(sorted((*labels, ("tool", "query")))))  # fmt: skip
    assert samples[duration] >= 2
