"""The second differential property: through the example policies, what reaches the
database is what the policy says, whatever the protocol sequence.

Scripts of ``diffgen.SHOP_POOL`` run as a support agent (``policies/support.yaml``,
with ``max_rows_affected`` of orders lowered to ``CAP`` so that a cap is reached on
the six orders of the shop), each script in a task of its own, from the same rows.
After each script, against the rows actually changed (read directly as superuser):

* no order is ever removed: a DELETE marks it (soft delete), by this agent, with its
  image in ``guardproxy.deleted_rows`` for the task;
* a write is never counted less than it changed: the task's ``rows_written`` in
  ``guardproxy.task_budgets`` (counted in the write's own transaction) is at least
  the number of rows the script left changed; at the end of a run the audit log's
  rows per task are too (``audit_shortfalls``);
* no write reports more rows than the cap (a write past it is undone, whatever the
  protocol path: row limits, several Executes of one portal, a Bind and its Execute
  in different rounds...);
* no statement runs under another statement's decision: every CommandComplete has
  the verb of the text its portal was bound from, following the client's own
  Parse/Bind/Close history as the proxy acknowledged it (a SELECT parsed under a name
  after a DELETE never answers ``DELETE n``; a portal bound before a Parse of the same
  name runs what it was bound to), and no read shows a soft-deleted order (every such
  read in the pool ends its select list with ``deleted_at``, which must be NULL);
* the server the client gives back still answers the next client.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from diffbugs import known_policy_bug
from diffgen import CURSOR
from diffwire import (
    Answer,
    Bind,
    Broken,
    Close,
    Conn,
    Execute,
    Parse,
    Query,
    Script,
    Transcript,
    run_script,
)
from pgcluster import PgCluster

from guardproxy.protocol import codec

AGENT = "support-diff"
CAP = 2  # tables.orders.max_rows_affected in the copy of the example policies
ANSWER_WITHIN = 1.5  # seconds: a managed write is a few round trips on loopback
SHOP_DB = "shop"
_tasks = itertools.count(1)
_RUN = os.urandom(3).hex()  # task names unique across runs on one database

# an upsert: the rows as seeded, even one a write removed
RESET_ORDERS = """
INSERT INTO orders SELECT * FROM jsonb_populate_recordset(NULL::orders, %s::jsonb)
ON CONFLICT (id) DO UPDATE SET fulfillment_status = EXCLUDED.fulfillment_status,
    shipped_at = EXCLUDED.shipped_at, tracking_number = EXCLUDED.tracking_number,
    last_modified_at = EXCLUDED.last_modified_at, deleted_at = EXCLUDED.deleted_at,
    deleted_by = EXCLUDED.deleted_by, delete_reason = EXCLUDED.delete_reason
"""
RESET_LOG = "DELETE FROM order_state_log WHERE id > %s"
STATE_SQL = """
SELECT (SELECT coalesce(json_agg(t ORDER BY t.id), '[]') FROM orders t),
       (SELECT coalesce(json_agg(t ORDER BY t.id), '[]') FROM order_state_log t)
"""
_VERBS = {
    "ROLLBACK TO": ("ROLLBACK",),
    "COMMIT": ("COMMIT", "ROLLBACK"),  # COMMIT of a failed transaction answers ROLLBACK
    "DECLARE": ("DECLARE CURSOR",),
    "FETCH": ("FETCH", "SELECT"),  # an Execute of a DECLAREd cursor's portal says SELECT
}


def policies_for(directory: Path) -> Path:
    """The example policies, with the cap on orders lowered to CAP (six orders, after all)."""
    from proofkit import policies_with

    return policies_with(directory, support={"tables": {"orders": {"max_rows_affected": CAP}}})


@dataclass
class ShopRun:
    scripts: int = 0
    rows_changed: dict[str, int] = field(default_factory=dict)  # per task
    known: Counter[str] = field(default_factory=Counter)  # problems of known bugs (diffbugs)
    pool_hangs: int = 0  # the known bug "server skipping to sync back in the pool"
    restarts: int = 0  # proxies replaced after a session stopped answering


class ShopChecker:
    """Runs scripts as the support agent through ``port`` and checks what they did."""

    def __init__(self, pg: PgCluster, port: int, restart: Callable[[], int]) -> None:
        self.port = port
        self.restart = restart  # a new proxy in place of one a known bug left stuck
        self.admin = psycopg.connect(pg.dsn(user="postgres", dbname=SHOP_DB), autocommit=True)
        self.admin.execute("SET lock_timeout = '10s'")
        row = self.admin.execute(
            "SELECT json_agg(t ORDER BY t.id), (SELECT max(id) FROM order_state_log) FROM orders t"
        ).fetchone()
        assert row is not None
        self.seed, self.log_rows = json.dumps(row[0]), row[1]
        self.run = ShopRun()

    def close(self) -> None:
        self.reset()
        self.admin.close()

    def reset(self) -> None:
        self.admin.execute(RESET_ORDERS, (self.seed,))
        self.admin.execute(RESET_LOG, (self.log_rows,))

    def check(self, script: Script) -> list[str]:
        """What went wrong in ``script`` (empty: what the policy says happened)."""
        self.reset()
        before = self._state()
        task = f"diff-{_RUN}-{next(_tasks)}"
        conn, _ = Conn.open(("127.0.0.1", self.port), AGENT, SHOP_DB)
        conn.sock.settimeout(ANSWER_WITHIN)
        try:
            prologue: Script = ((Query(f"SET guard.task = '{task}'"),),)
            transcript = run_script(conn, prologue + script)
        finally:
            conn.close()
        self.run.scripts += 1
        problems = []
        answers = Transcript(batches=transcript.batches[1:])
        if transcript.broken:
            problems.append(f"the proxy stopped answering: {transcript.broken}")
        problems += self._answers(script, answers)
        problems += self._effects(task, before, self._state())
        if not self._next_client_served():
            self.run.pool_hangs += 1
        unexplained = []
        for problem in problems:
            bug = known_policy_bug(problem, script, answers)
            if bug is None:
                unexplained.append(problem)
            else:
                self.run.known[bug] += 1
        if any(p.startswith("the proxy stopped answering") for p in problems):
            self.run.restarts += 1  # a stuck session keeps its server even once its client left
            self.port = self.restart()
        return unexplained

    # ------------------------------------------------------------ the database

    def _state(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        row = self.admin.execute(STATE_SQL).fetchone()
        assert row is not None
        return row[0], row[1]

    def _effects(self, task: str, before: Any, after: Any) -> list[str]:
        problems = []
        orders_before = {o["id"]: o for o in before[0]}
        orders_after = {o["id"]: o for o in after[0]}
        removed = sorted(orders_before.keys() - orders_after.keys())
        if removed:
            problems.append(f"orders removed: {removed}")
        changed = [i for i, o in orders_after.items() if orders_before.get(i) != o]
        marked = [i for i in changed if orders_after[i]["deleted_at"] is not None]
        added = len(after[1]) - len(before[1])
        for order in marked:
            if orders_after[order]["deleted_by"] != AGENT:
                problems.append(
                    f"order {order} marked deleted by {orders_after[order]['deleted_by']}"
                )
        if marked:
            kept = self.admin.execute(
                "SELECT array_agg((primary_key->>'id')::int) FROM guardproxy.deleted_rows "
                "WHERE task = %s AND table_name = 'public.orders'",
                (task,),
            ).fetchone()
            missing = set(marked) - set((kept or [None])[0] or [])
            if missing:
                problems.append(f"soft-deleted orders {sorted(missing)} have no deleted_rows image")
        total = len(removed) + len(changed) + added
        self.run.rows_changed[task] = total
        row = self.admin.execute(
            "SELECT rows_written FROM guardproxy.task_budgets WHERE task = %s", (task,)
        ).fetchone()
        counted = int(row[0]) if row else 0
        if counted < total:
            problems.append(
                f"the task changed {total} rows ({len(removed)} orders removed, {len(changed)} "
                f"changed, {added} log rows) and its budget counted {counted}"
            )
        return problems

    # ------------------------------------------------------------ the answers

    def _answers(self, script: Script, transcript: Transcript) -> list[str]:
        """Verbs and rows of every answer, following the statements and portals the proxy
        acknowledged (its own ParseComplete / BindComplete / CloseComplete)."""
        problems: list[str] = []
        statements: dict[str, str] = {}
        portals: dict[str, str] = {}
        for number, batch in enumerate(script):
            if number >= len(transcript.batches):
                break
            answered = {a.step: a for a in transcript.batches[number]}
            for index, step in enumerate(batch):
                answer = answered.get(index)
                kinds = [kind for kind, _ in answer.msgs] if answer else []
                where = f"batch {number} step {index} {step!r}"
                if isinstance(step, Parse) and kinds[:1] == [b"1"]:
                    statements[step.name] = step.sql
                elif isinstance(step, Parse) and not step.name:
                    statements.pop("", None)
                elif isinstance(step, Bind) and kinds[:1] == [b"2"]:
                    portals.pop(step.portal, None)
                    if step.statement in statements:
                        portals[step.portal] = statements[step.statement]
                elif isinstance(step, Close) and kinds[:1] == [b"3"]:
                    (statements if step.target == "S" else portals).pop(step.name, None)
                elif isinstance(step, Query):
                    statements.pop("", None)
                    portals.pop("", None)
                    problems += _verbs(answer, step.sql, where)
                elif isinstance(step, Execute) and step.portal in portals:
                    problems += _verbs(answer, portals[step.portal], where)
                elif isinstance(step, Execute) and step.portal == CURSOR:
                    problems += _verbs(answer, "FETCH FROM c1", where)  # a DECLAREd cursor
                if answer is not None and answer.msgs and answer.msgs[-1] == (b"Z", b"I"):
                    portals.clear()  # the transaction ended, and its portals with it
        return problems

    def _next_client_served(self) -> bool:
        """The server the script's client gave back answers another client's Query."""
        # the same agent id: the next script's client then gets the server without the
        # proxy replaying an application_name first, which meets a known bug of its own
        # (diffbugs: "hidden settings replay ends the client's round")
        conn, _ = Conn.open(("127.0.0.1", self.port), AGENT, SHOP_DB)
        conn.sock.settimeout(ANSWER_WITHIN)
        try:
            # a server left skipping to a Sync answers only the Sync (see diffrun's probe)
            conn.send(codec.build_query("SELECT 1") + codec.SYNC)
            kind = b""
            while kind != b"Z":
                kind, _ = conn.read()
                if kind in b"TD":
                    return True
            return False
        except Broken:
            return False
        finally:
            conn.close()  # a hung server is closed with it: the pool heals


def _verbs(answer: Answer | None, sql: str, where: str) -> list[str]:
    """Problems with one answer to ``sql``: a tag of another statement, a row past the cap,
    a soft-deleted order shown."""
    if answer is None:
        return []
    problems = []
    head = sql.split()[0].upper() if sql.strip() else ""
    key = "ROLLBACK TO" if sql.upper().startswith("ROLLBACK TO") else head
    allowed = _VERBS.get(key, (head,))
    shows_deleted_at = "deleted_at" in sql.split("FROM")[0] or head == "FETCH"
    for kind, body in answer.msgs:
        if kind == b"C":
            tag = body.rstrip(b"\x00").decode()
            if not any(tag == verb or tag.startswith(verb + " ") for verb in allowed):
                problems.append(f"{where}: {sql!r} answered {tag!r}")
            verb, _, count = tag.rpartition(" ")
            if verb in ("UPDATE", "DELETE") and count.isdigit() and int(count) > CAP:
                problems.append(f"{where}: {tag!r} past the cap of {CAP} rows")
        elif kind == b"D" and shows_deleted_at and _last_field(body) is not None:
            problems.append(f"{where}: {sql!r} showed a soft-deleted order")
    return problems


def _last_field(body: bytes) -> bytes | None:
    count = int.from_bytes(body[:2], "big")
    pos, value = 2, None
    for _ in range(count):
        length = int.from_bytes(body[pos : pos + 4], "big", signed=True)
        pos += 4
        value = None if length < 0 else body[pos : pos + length]
        pos += max(length, 0)
    return value


def audit_shortfalls(pg: PgCluster, run: ShopRun, wait: float = 10.0) -> list[str]:
    """Tasks whose audit events count fewer rows than they changed (after the audit writer
    has stored what it holds: it writes in batches, off the hot path)."""
    tasks = [task for task, rows in run.rows_changed.items() if rows]
    if not tasks:
        return []
    with psycopg.connect(pg.dsn(user="postgres", dbname=SHOP_DB), autocommit=True) as conn:
        deadline, last, audited = time.monotonic() + wait, None, {}
        while time.monotonic() < deadline:
            rows = conn.execute(
                "SELECT task, sum(rows) FROM guardproxy.audit_events WHERE task = ANY(%s) "
                "AND decision IN ('allowed', 'rewritten') GROUP BY task",
                (tasks,),
            ).fetchall()
            audited = {task: int(total or 0) for task, total in rows}
            if audited == last and all(audited.get(t, 0) >= run.rows_changed[t] for t in tasks):
                break
            last = audited
            time.sleep(0.3)
    return [
        f"task {task} changed {run.rows_changed[task]} rows, its audit events count "
        f"{audited.get(task, 0)}"
        for task in tasks
        if audited.get(task, 0) < run.rows_changed[task]
    ]


@contextlib.contextmanager
def shop_checker(pg: PgCluster, workdir: Path) -> Iterator[ShopChecker]:
    """guardproxy with the (capped) example policies in front of the shop database; a new
    one in its place whenever a known bug left it unable to serve (servers it keeps)."""
    from proofkit import launch
    from shop import RawAgent

    policies = policies_for(workdir)
    logs = itertools.count()
    with contextlib.ExitStack() as stack:

        def start() -> int:
            stack.close()
            log = workdir / f"shop-{next(logs)}.log"
            # a stuck session would hold a graceful shutdown for its whole timeout
            proxy = stack.enter_context(launch(pg, log, policies, shutdown_timeout=1))
            # the agent's application_name on the first server before any script runs: a
            # replay ahead of a script's first round meets a known bug (see _next_client_served)
            with RawAgent(proxy.port, AGENT, dbname=SHOP_DB) as agent:
                agent.query("SELECT 1")
            return proxy.port

        checker = ShopChecker(pg, start(), start)
        try:
            yield checker
        finally:
            checker.close()
            stack.close()
