"""`guardproxy demo`: scripted agents of the three example types against a real proxy.

It starts a proxy (a subprocess, as a user would run it) in front of the embedded
default or the given upstream, after loading the example shop schema, guardproxy's
schema and the agent roles, then plays: ordinary work, a denied read of payments,
a soft-deleted order, an idempotent retry, a row-cap refusal and a slow query cut
by its timeout. It ends with the audit of what was deleted and DB time per agent.

Its MCP section (`play_mcp`) plays an agent that speaks MCP: ``guardproxy mcp stdio``
started by the MCP SDK's client, as an agent runtime would, for analytics and support.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg

Say = Callable[[str], None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_proxy(upstream: str, policies: Path) -> Iterator[int]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "guardproxy",
            "serve",
            "--upstream",
            upstream,
            "--listen-port",
            str(port),
            "--policies",
            str(policies),
            "--admin-users",
            "admin",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=1),
            ):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"the demo proxy did not start: {err}")
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)


def _outcome(
    conn: psycopg.Connection[tuple[object, ...]], sql: str, params: tuple[object, ...] = ()
) -> str:
    try:
        cur = conn.execute(sql.encode(), params or None)
    except psycopg.Error as exc:
        diag = exc.diag
        return f"refused [{diag.sqlstate}] {diag.message_primary}"
    if cur.description:
        rows = cur.fetchall()
        return f"{cur.statusmessage}: {rows[:3]}{' ...' if len(rows) > 3 else ''}"
    return str(cur.statusmessage)


def play(port: int, database: str, say: Say) -> None:
    def agent(name: str, **tags: str) -> psycopg.Connection[tuple[object, ...]]:
        options = " ".join(f"-c guard.{k}={v}" for k, v in tags.items())
        return psycopg.connect(
            f"postgresql://{name}@127.0.0.1:{port}/{database}",
            autocommit=True,
            options=options or None,
            connect_timeout=10,
        )

    say("== analytics-1: ordinary reporting")
    with agent("analytics-1", task="report-7") as a:
        say(
            "  orders by status      -> "
            + _outcome(a, "SELECT fulfillment_status, count(*) FROM orders GROUP BY 1 ORDER BY 1")
        )
        say("  read payments         -> " + _outcome(a, "SELECT amount, card_last4 FROM payments"))
        say("  read customers.email  -> " + _outcome(a, "SELECT name, email FROM customers"))
        say(
            "  slow query (timeout)  -> "
            + _outcome(a, "SELECT count(*) FROM generate_series(1, 200000000) g")
        )
    say("== support-1: a refund task")
    with agent("support-1", task="refund-42", step="1") as s:
        say(
            "  mark order 1 packed   -> "
            + _outcome(s, "UPDATE orders SET fulfillment_status = 'packed' WHERE id = %s", (1,))
        )
        s.execute("SET guard.reason = 'duplicate order'")
        say("  delete order 2        -> " + _outcome(s, "DELETE FROM orders WHERE id = %s", (2,)))
        say(
            "  update all orders     -> "
            + _outcome(s, "UPDATE orders SET fulfillment_status = 'cancelled'")
        )
        insert = (
            "INSERT INTO order_state_log (order_id, previous_status, new_status, changed_by) "
            "VALUES (%s, 'pending', 'packed', 'support-1') RETURNING id"
        )
        first = _outcome(s, f"/* idempotency_key='refund-42-log' */ {insert}", (1,))
        say("  log the change        -> " + first)
        say(
            "  ... retried           -> "
            + _outcome(s, f"/* idempotency_key='refund-42-log' */ {insert}", (1,))
        )
    say("== fulfillment-1: shipping")
    with agent("fulfillment-1", task="ship-9") as f:
        say(
            "  ship order 3          -> "
            + _outcome(
                f,
                "UPDATE orders SET fulfillment_status = 'shipped', shipped_at = now(), tracking_number = %s "
                "WHERE id = %s",
                ("TRK-3", 3),
            )
        )
        say("  read payments         -> " + _outcome(f, "SELECT * FROM payments"))


def play_mcp(port: int, database: str, policies: Path, say: Say) -> None:
    """The same policies through the MCP front door (`guardproxy.mcp`)."""
    import anyio

    anyio.run(_play_mcp, port, database, policies, say)


async def _play_mcp(port: int, database: str, policies: Path, say: Say) -> None:
    import json
    import os

    from mcp import Client, StdioServerParameters

    def client(agent: str) -> Client:
        args = ["-m", "guardproxy", "mcp", "stdio", "--agent", agent, "--policies", str(policies)]
        args += ["--proxy", f"postgresql://127.0.0.1:{port}/{database}"]
        params = StdioServerParameters(command=sys.executable, args=args, env=dict(os.environ))
        return Client(params, read_timeout_seconds=30)

    async def outcome(c: Client, tool: str, **arguments: object) -> str:
        result = await c.call_tool(tool, arguments)
        text = "".join(getattr(block, "text", "") for block in result.content)
        if result.is_error:
            text = text.removeprefix(f"Error executing tool {tool}: ").split("\n")[0]
            if text.startswith("ERROR "):
                return "refused " + text.removeprefix("ERROR ")
            return "refused: " + text.split(". ")[0]
        data = json.loads(text)
        if "tables" in data:
            return "tables " + ", ".join(t["table"] for t in data["tables"])
        rows = data.get("rows") or ""
        return f"{data.get('command')}{': ' + str(rows[:3]) if rows else ''}"

    say("== MCP: the same policies for agents that speak the Model Context Protocol")
    async with client("analytics-1") as a:
        say("  analytics-1 over MCP (guardproxy mcp stdio)")
        say("  describe              -> " + await outcome(a, "describe"))
        say(
            "  orders by status      -> "
            + await outcome(
                a,
                "query",
                sql="SELECT fulfillment_status, count(*) FROM orders GROUP BY 1 ORDER BY 1",
            )
        )
        say(
            "  delete an order       -> "
            + await outcome(a, "query", sql="DELETE FROM orders WHERE id = 5")
        )
    async with client("support-1") as s:
        say("  support-1 over MCP")
        await outcome(s, "task", task="mcp-cleanup-1", step="1")
        say(
            "  delete order 5        -> "
            + await outcome(
                s, "query", sql="DELETE FROM orders WHERE id = $1", params=[5], reason="test order"
            )
        )
        say(
            "  stacked statements    -> "
            + await outcome(s, "query", sql="COMMIT; DROP TABLE payments")
        )


def report(port: int, upstream: str, say: Say) -> None:
    from guardproxy.store.audit_queries import deletes, parse_since

    say("== audit: what agents deleted")
    for row in deletes(upstream, None, None, parse_since("1h")):
        say(
            f"  {row['how']:4} {row['table']} {row['primary_key']} by {row['agent']} "
            f"task={row['task']} step={row['step']} reason={row['reason']}"
        )
    say("== DB time per agent (SHOW AGENTS)")
    with psycopg.connect(
        f"postgresql://admin@127.0.0.1:{port}/guardproxy", autocommit=True
    ) as admin:
        for agent_row in admin.execute("SHOW AGENTS").fetchall():
            _, agent_type, _, statements, db_time, denials, _ = agent_row
            say(
                f"  {agent_type:12} statements={statements:>4} db_time={db_time}s denials={denials}"
            )


def run(upstream: str, policies: Path, say: Say) -> None:

    database = upstream.rsplit("/", 1)[-1].split("?", 1)[0]
    with running_proxy(upstream, policies) as port:
        play(port, database, say)
        play_mcp(port, database, policies, say)
        time.sleep(0.5)  # the audit log writes in batches
        report(port, upstream, say)
