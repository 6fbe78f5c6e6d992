"""An outsider's attack on the record (issue 14): audit integrity, guardproxy's own
schema, reloads that revoke, the idempotency ledger, undo, operator surfaces.

Each test sends what an agent (or an unauthenticated peer) controls through a real
guardproxy in front of the shop database and judges the EFFECT, read back as
superuser: the audit row is there, guardproxy's schema is unchanged, a revoked table
is not read, the operator's terminal gets no raw control bytes, the agent can still
log in. Tests marked ``xfail(strict=True)`` reproduce a finding: they fail today and
must pass once it is fixed; the others are attacks the proxy withstood.

Covered:
- hostile context (escape sequences, bidi controls, invalid UTF-8, lone surrogates,
  over-long values, NUL) on every channel (comment, ``SET guard.*``, startup
  ``options``, application_name, extended protocol), with another agent's write in
  the same batch; tags that imitate the writer's ``guardproxy.altered`` or name
  another agent;
- a pipelined flood of denials from other agents filling the audit queue, with
  ``on_loss: count`` (a finding, fixed) and ``fail_closed`` (held);
- every write path on record (writable CTE, EXPLAIN ANALYZE, MERGE, UPDATE FROM,
  RETURNING, transaction) and every delete path soft and undoable (CTE, USING,
  MERGE ... DELETE, RETURNING, subquery, EXPLAIN ANALYZE, WHERE CURRENT OF);
- a delete reason that tries to break out of the soft-delete rewrite;
- guardproxy's schema by name, quoted, Unicode-escaped, COPY, TRUNCATE (also
  CASCADE), EXPLAIN, LOCK, COMMENT, PREPARE, DECLARE, SELECT INTO, writable CTE,
  functions of the schema, search_path (SET, set_config, startup options),
  sequences named in string literals (nextval / setval), file and dblink
  functions, in simple and extended protocol, as two agent types;
- Prometheus labels under agent-chosen setting, function and table names;
  ``pg_stat_activity`` application_name; ``guardproxy_monitoring`` views against
  comments that imitate the proxy's tag; the HTTP port echoing requests;
- reloads (RELOAD and SIGHUP) narrowing what a half-read portal, a cursor (with
  hold or in a transaction), a prepared write (named, bound, SQL PREPARE), a
  logged-in session whose id no longer matches, and a prepared read may do: table
  revoked, row filter added, row cap lowered, column denied;
- an expired idempotency key re-claimed, serially and by two sessions at once
  (expiry moved in the ledger);
- undo of a delete prepared under one context and executed under another
  (extended protocol, bound portal + SET LOCAL, SQL PREPARE with comment or SET);
- the audit CLI (deletes, writes, denials, task, undo --dry-run; table and records
  layouts), the admin console and ``top`` with hostile stored and live text;
- SHOW CONFIG, SHOW POOLS/SERVERS and the log with 17 credential forms in the
  upstream DSN;
- failed and aborted logins (bad mechanism, malformed SCRAM, claimed channel
  binding, bogus proof, hang-up) from other addresses; stalled and trickling
  pre-auth connections, and a steady stream of new ones; log lines forged with CR,
  U+2028, NEL and through database, application_name and options.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import shop
from pgcluster import PgCluster, free_port
from proofkit import policies_with
from shop import SHOP_DB, ShopProxy, launch_proxy
from test_attack_relay import (
    SYNC,
    Wire,
    bind,
    errors,
    execute,
    messages,
    parse,
    rows,
    su,
    summary,
    wire,
)

pytestmark = pytest.mark.timeout(180)

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline

ROOT = Path(__file__).resolve().parents[2]
WAIT = 5.0
GUARD_TABLES = {
    "deleted_rows": "t",
    "idempotency_keys": "t",
    "task_budgets": "t",
    "proxy_instances": "(t.slot, t.address, t.owner)",  # heartbeats move on their own
}
SEED = {1: "delivered", 2: "shipped", 3: "packed", 4: "pending", 5: "pending", 6: "cancelled"}
_RESET = [
    "UPDATE orders SET fulfillment_status = v.s, deleted_at = NULL, deleted_by = NULL, "
    "delete_reason = NULL FROM (VALUES "
    + ", ".join(f"({i}, '{s}')" for i, s in SEED.items())
    + ") AS v(i, s) WHERE id = v.i",
    "DELETE FROM guardproxy.deleted_rows WHERE agent_id LIKE '%-rec-%'",
    "DELETE FROM guardproxy.idempotency_keys WHERE agent_id LIKE '%-rec-%'",
    "DELETE FROM guardproxy.task_budgets WHERE task LIKE 'rec-%'",
]


# ---------------------------------------------------------------- helpers


def uid() -> str:
    return uuid.uuid4().hex[:8]


def status(pg: PgCluster, order: int) -> tuple[str, bool]:
    got = su(
        pg, "SELECT fulfillment_status, deleted_at IS NOT NULL FROM orders WHERE id = %s", order
    )
    return got[0][0], got[0][1]


def events(pg: PgCluster, agent: str, at_least: int = 1) -> list[dict[str, Any]]:
    """``agent``'s audit events as superuser reads them, waiting (bounded) for ``at_least``."""
    deadline = time.monotonic() + 8
    while True:
        with psycopg.connect(pg.dsn("postgres", dbname=SHOP_DB), autocommit=True) as conn:
            cur = conn.execute(
                "SELECT * FROM guardproxy.audit_events WHERE agent_id LIKE %s ORDER BY id",
                (agent.replace("%", r"\%") + "%",),
            )
            names = [d.name for d in cur.description or []]
            got = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        if len(got) >= at_least or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def guard_state(pg: PgCluster) -> dict[str, Any]:
    """guardproxy's own tables (but the audit log, which denials append to) and sequences."""
    out: dict[str, Any] = {}
    for table, what in GUARD_TABLES.items():
        out[table] = su(pg, f"SELECT md5(coalesce(string_agg({what}::text, '|' ORDER BY {what}::text), "
                        f"'')) FROM guardproxy.{table} t")[0][0]  # fmt: skip
    out["sequences"] = su(
        pg,
        "SELECT string_agg(sequencename || '=' || coalesce(last_value, 0)::text, ',' "
        "ORDER BY sequencename) FROM pg_sequences WHERE schemaname = 'guardproxy' "
        "AND sequencename <> 'audit_events_id_seq'",
    )[0][0]
    out["audit"] = su(pg, "SELECT count(*), max(id) FROM guardproxy.audit_events")[0]
    return out


def gp(*args: str, columns: int = 200, env: dict[str, str] | None = None) -> str:
    """``guardproxy ARGS`` as an operator runs it: its stdout and stderr, as bytes decoded
    without losing anything (surrogateescape)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GUARDPROXY_")}
    out = subprocess.run(
        [sys.executable, "-m", "guardproxy", *args],
        capture_output=True,
        cwd=ROOT,
        env=dict(base, COLUMNS=str(columns), **(env or {})),
        timeout=60,
        check=False,
    )
    return (out.stdout + out.stderr).decode("utf-8", errors="surrogateescape")


RAW_CONTROL = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]"
)


def raw_controls(text: str) -> list[str]:
    return sorted({repr(m) for m in RAW_CONTROL.findall(text)})


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as resp:
        return str(resp.read().decode())


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shop_restored(shop_db: PgCluster, shop_baseline: dict[str, Any]) -> Iterator[PgCluster]:
    yield shop_db
    if shop.snapshot(shop_db) != shop_baseline:
        shop.restore_shop(shop_db)


@pytest.fixture(scope="module")
def record_proxy(
    shop_restored: PgCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ShopProxy, int, Path]]:
    directory = tmp_path_factory.mktemp("attack-record")
    policies = policies_with(directory)
    metrics_port = free_port()
    with launch_proxy(
        shop_restored,
        directory / "guardproxy.log",
        policies=policies,
        admin_users="admin",
        metrics_port=metrics_port,
    ) as proxy:
        yield proxy, metrics_port, policies


@pytest.fixture
def fresh(
    shop_restored: PgCluster, record_proxy: Any, request: pytest.FixtureRequest
) -> Iterator[PgCluster]:
    for sql in _RESET:
        su(shop_restored, sql)
    since = len(record_proxy[0].log())
    yield shop_restored
    shop.dump_log_on_failure(request, record_proxy[0], since)
    for sql in _RESET:
        su(shop_restored, sql)


def admin(proxy: ShopProxy, sql: str) -> list[tuple[Any, ...]]:
    dsn = f"postgresql://admin@127.0.0.1:{proxy.port}/guardproxy"
    with psycopg.connect(dsn, autocommit=True, connect_timeout=int(WAIT)) as conn:
        return conn.execute(sql).fetchall()


@contextlib.contextmanager
def policy_changed(
    proxy: ShopProxy, path: Path, old: str, new: str, how: str = "RELOAD"
) -> Iterator[None]:
    """``path`` with ``old`` replaced by ``new``, reloaded (RELOAD or SIGHUP), restored after."""
    original = path.read_text()
    assert old in original, (old, original)

    def reload(text: str) -> None:
        since = len(proxy.log())
        path.write_text(text)
        if how == "SIGHUP":
            proxy.proc.send_signal(signal.SIGHUP)
            proxy.wait_for_log(r"reloaded|policies loaded|policy set", after=since)
        else:
            assert "reloaded" in str(admin(proxy, "RELOAD")), proxy.log()[since:]

    try:
        reload(original.replace(old, new))
        yield
    finally:
        reload(original)


# ================================================================ every write on record

WRITE = "UPDATE orders SET fulfillment_status = 'packed' WHERE id = 4"
LONG = "rec-" + "\u00e9\u4e2d" * 3000
HOSTILE_CONTEXT: dict[str, tuple[dict[str, str], list[str]]] = {
    # name: (startup parameters, statements before the write), the write follows
    "escape and bidi in a comment's task": ({}, [f"/* task='rec%1b%5b2J%e2%80%aeX' */ {WRITE}"]),
    "invalid utf-8 in a comment's task": ({}, [f"/* task='rec%ff%fe%c0' */ {WRITE}"]),
    "NUL in step": ({}, [f"/* task='rec-s',step='a%00b' */ {WRITE}"]),
    "NUL in principals": ({}, [f"/* principals='a%00,b' */ {WRITE}"]),
    "NUL in a free tag": ({}, [f"/* trace='x%00y',task='rec-t' */ {WRITE}"]),
    "over-long task": ({}, [f"/* task='{LONG}' */ {WRITE}"]),
    "escape set with SET guard.task": ({}, ["SET guard.task = E'rec\\x1b[31m\\u202e'", WRITE]),
    "lone surrogate via SET": ({}, ["SET guard.step = E'\\ud800x'", WRITE]),
    "control bytes in startup options": (
        {"options": "-c guard.task=rec\x01\x1b[2J -c guard.step=\x7f"},
        [WRITE],
    ),
    "control bytes in application_name": ({"application_name": "app\x1b]0;x\x07"}, [WRITE]),
}


def _send_write(
    proxy: ShopProxy, agent: str, params: dict[str, str], stmts: list[str]
) -> list[str]:
    conn = Wire(proxy.port, agent, SHOP_DB, **params)
    try:
        codes: list[str] = []
        for sql in stmts:
            codes += errors(conn.q(sql))
        return codes
    finally:
        conn.close()


@pytest.mark.parametrize("case", sorted(HOSTILE_CONTEXT))
def test_a_committed_write_with_hostile_context_is_on_record(fresh, record_proxy, case: str):
    proxy, metrics_port, _ = record_proxy
    params, stmts = HOSTILE_CONTEXT[case]
    agent = f"support-rec-{uid()}"
    other = f"fulfillment-rec-{uid()}"
    try:
        codes = _send_write(proxy, agent, params, stmts)
    except ConnectionError as exc:  # refused at the door: fine, if nothing was written
        codes = [f"closed: {exc}"]
    # another agent's write in the same batch
    with proxy.connect(other, autocommit=True) as conn:
        conn.execute("UPDATE orders SET tracking_number = 'TRK-rec' WHERE id = 3")
    written = status(fresh, 4) == ("packed", False)
    mine = [e for e in events(fresh, agent, 1) if e["decision"] != "denied"]
    theirs = events(fresh, other, 1)
    assert [e["rows"] for e in theirs] == [1], theirs
    if written:
        assert [e["rows"] for e in mine] == [1], (codes, mine)
        for event in mine:
            for field in ("task", "step", "statement", "agent_id"):
                value = event[field] or ""
                assert "\x00" not in value and "\x1b" not in value and "\u202e" not in value
    else:
        assert codes, "nothing written and no error"
    assert "guardproxy_audit_events_lost_total 0" in metrics_text(metrics_port) or (
        "guardproxy_audit_events_lost_total" not in metrics_text(metrics_port)
    )


def test_an_extended_protocol_write_with_a_nul_task_is_on_record(fresh, record_proxy):
    proxy, _, _ = record_proxy
    agent = f"support-rec-ext-{uid()}"
    with wire(proxy.port, agent) as conn:
        got = conn.round(
            parse(b"w", f"/* task='rec%00ext' */ {WRITE.replace('4', '$1')}", (23,)),
            bind(b"", b"w", b"4"),
            execute(),
            SYNC,
        )
    if status(fresh, 4) == ("packed", False):
        assert [e["rows"] for e in events(fresh, agent) if e["decision"] != "denied"] == [1]
    else:
        assert errors(got), summary(got)


@pytest.mark.parametrize(
    "reason",
    [
        "x', 'forged', 'orders', '{}'::jsonb, '{}'::jsonb); --",
        "$$ ) ; DELETE FROM orders; $$",
        "a\\'b%00c",
    ],
)
def test_a_delete_reason_cannot_break_out_of_the_soft_delete_rewrite(fresh, record_proxy, reason):
    proxy, _, _ = record_proxy
    agent = f"support-rec-del-{uid()}"
    encoded = urllib.parse.quote(reason, safe="")
    with wire(proxy.port, agent) as conn:
        got = conn.q(f"/* reason='{encoded}',task='rec-del' */ DELETE FROM orders WHERE id = 5")
    recorded = su(
        fresh,
        "SELECT reason, table_name, primary_key::text FROM guardproxy.deleted_rows WHERE agent_id = %s",
        agent,
    )
    deleted = su(fresh, "SELECT id FROM orders WHERE deleted_at IS NOT NULL ORDER BY id")
    if errors(got):
        assert recorded == [] and deleted == [], (messages(got), recorded)
    else:
        assert deleted == [(5,)] and len(recorded) == 1, recorded
        assert recorded[0][1:] == ("public.orders", '{"id": 5}') or recorded[0][1] in ("orders",)
        assert status(fresh, 1) == ("delivered", False)


# ================================================================ guardproxy's own schema

SCHEMA_ATTEMPTS = {
    "nextval in a string literal": "SELECT nextval('guardproxy.deleted_rows_id_seq')",
    "setval in a string literal": "SELECT setval('guardproxy.deleted_rows_id_seq', 1, false)",
    "nextval via regclass cast": "SELECT nextval('guardproxy.deleted_rows_id_seq'::regclass)",
    "quoted schema and table": 'DELETE FROM "guardproxy"."task_budgets" WHERE true',
    "unicode-escaped schema": 'UPDATE U&"guardpro\\0078y".idempotency_keys SET key = key WHERE true',
    "explain analyze": "EXPLAIN ANALYZE DELETE FROM guardproxy.deleted_rows WHERE true",
    "copy from stdin": "COPY guardproxy.deleted_rows (agent_id) FROM STDIN",
    "truncate": "TRUNCATE guardproxy.proxy_instances",
    "insert forged deleted row": "INSERT INTO guardproxy.deleted_rows (agent_id, table_name, "
    "primary_key, row_image) VALUES ('x', 'public.orders', '{\"id\": 1}', '{}')",
    "writable cte": "WITH d AS (DELETE FROM guardproxy.task_budgets RETURNING 1) SELECT count(*) FROM d",
    "function of the schema": "SELECT guardproxy.refuse_soft_deleted(now(), 'x')",
    "function via ROWS FROM": "SELECT * FROM ROWS FROM (guardproxy.check_insert(true, 'a', 'b'))",
    "set_config search_path in a where": "SELECT id FROM orders WHERE "
    "set_config('search_path', 'guardproxy', true) IS NOT NULL",
    "lock the ledger": "LOCK TABLE guardproxy.idempotency_keys",
    "comment on": "COMMENT ON TABLE guardproxy.audit_events IS 'x'",
    "prepare": "PREPARE gx AS DELETE FROM guardproxy.deleted_rows",
    "declare cursor": "DECLARE gc CURSOR FOR SELECT * FROM guardproxy.idempotency_keys",
    "select into": "SELECT * INTO TEMP t_gx FROM guardproxy.audit_events",
    "table": "TABLE guardproxy.audit_events",
    "pg_read of table file": "SELECT pg_read_binary_file(pg_relation_filepath('guardproxy.audit_events'))",
    "dblink-like": "SELECT * FROM dblink('dbname=shop', 'DELETE FROM guardproxy.task_budgets') AS t(x int)",
    "truncate through orders cascade": "TRUNCATE orders CASCADE",
}


@pytest.mark.parametrize("how", ["simple", "extended"])
@pytest.mark.parametrize("attempt", sorted(SCHEMA_ATTEMPTS))
def test_an_agent_cannot_reach_guardproxys_schema(fresh, record_proxy, attempt: str, how: str):
    proxy, _, _ = record_proxy
    su(fresh, "INSERT INTO guardproxy.task_budgets (task, agent_type, statements, rows_written) "
              "VALUES ('rec-canary', 'support', 1, 1) ON CONFLICT DO NOTHING")  # fmt: skip
    before = guard_state(fresh)
    sql = SCHEMA_ATTEMPTS[attempt]
    for agent_type in ("support", "analytics"):
        with wire(proxy.port, f"{agent_type}-rec-schema-{uid()}") as conn:
            conn.q("BEGIN")
            if how == "simple":
                got = conn.q(sql)
            else:
                got = conn.round(parse(b"", sql), bind(b"", b""), execute(), SYNC)
            conn.q("COMMIT")
        assert errors(got), (agent_type, summary(got))
        assert not rows(got) or attempt == "set_config search_path in a where", summary(got)
    after = guard_state(fresh)
    before.pop("audit")
    after.pop("audit")
    assert after == before
    assert su(fresh, "SELECT count(*) FROM guardproxy.task_budgets WHERE task = 'rec-canary'") == [
        (1,)
    ]
    assert su(fresh, "SELECT count(*) FROM orders WHERE deleted_at IS NULL") == [(6,)]


@pytest.mark.parametrize(
    "options",
    ["-c search_path=guardproxy,public", "-c role=app_owner", "-c session_authorization=postgres"],
)
def test_startup_options_cannot_change_whose_schema_or_role_the_session_uses(
    fresh, record_proxy, options
):
    proxy, _, _ = record_proxy
    try:
        conn = Wire(proxy.port, f"support-rec-opt-{uid()}", SHOP_DB, options=options)
    except ConnectionError:
        return  # refused at login: fine
    try:
        got = conn.q("SELECT current_user, current_setting('search_path')")
    finally:
        conn.close()
    if not errors(got):
        user, path = rows(got)[0]
        assert user == "guard_support" and "guardproxy" not in (path or ""), rows(got)


# ================================================================ monitoring views and labels


def test_prometheus_labels_stay_bounded_and_unforgeable_under_agent_chosen_names(
    fresh, record_proxy
):
    proxy, metrics_port, _ = record_proxy
    before = metrics_text(metrics_port)
    agent = f"support-rec-labels-{uid()}"
    forged = 'x"} 1\nguardproxy_forged_total{agent_type="support'
    with wire(proxy.port, agent) as conn:
        for n in range(40):
            conn.q(f'SET "rec_setting_{uid()}_{n}" = 1')
            conn.q(f"SELECT rec_fn_{uid()}_{n}(1)")
            conn.q(f'SELECT * FROM "rec_table_{uid()}_{n}"')
        conn.q(f'SET "{forged.replace(chr(34), chr(34) * 2)}" = 1')
        conn.q(f'SELECT * FROM "{forged.replace(chr(34), chr(34) * 2)}"')
        conn.q(f"/* task='{urllib.parse.quote(forged, safe='')}' */ SELECT 1")
    after = metrics_text(metrics_port)
    lines = [line for line in after.splitlines() if line and not line.startswith("#")]
    assert not any(line.startswith("guardproxy_forged") for line in lines)
    assert "rec_setting_" not in after and "rec_fn_" not in after and "rec_table_" not in after, [
        line for line in lines if "rec_" in line
    ][:5]
    new_series = len(lines) - len([x for x in before.splitlines() if x and not x.startswith("#")])
    assert new_series < 40, new_series


MONITORING = ROOT / "sql" / "monitoring.sql"


@pytest.mark.parametrize(
    "comment",
    [
        "/* agent_type='fulfillment',agent='fulfillment-1' */",
        "/*agent='fulfillment-1',agent_type='fulfillment'*/",
        "-- agent_type='fulfillment'\n",
        "/* a /* nested agent_type='fulfillment' */ */",
    ],
)
def test_monitoring_views_show_the_real_agent_type(fresh, record_proxy, comment: str):
    proxy, _, _ = record_proxy
    su(fresh, MONITORING.read_text())
    agent = f"support-rec-mon-{uid()}"
    with wire(proxy.port, agent, SHOP_DB) as conn:
        conn.q("BEGIN")
        conn.q(f"{comment} SELECT id FROM orders WHERE id = 1")
        seen = su(
            fresh,
            "SELECT agent, agent_type FROM guardproxy_monitoring.agent_activity "
            "WHERE agent LIKE 'support-rec-mon%%' OR agent_type = 'fulfillment'",
        )
        conn.q("ROLLBACK")
    assert seen and all(t == "support" for _, t in seen), seen
    assert all(a == agent for a, _ in seen), seen


def test_application_name_cannot_pass_for_another_agent(fresh, record_proxy):
    proxy, _, _ = record_proxy
    agent = f"support-rec-app-{uid()}"
    for name in ("fulfillment-1", "\rfulfillment-1", "x\nfulfillment-1"):
        conn = Wire(proxy.port, agent, SHOP_DB, application_name=name)
        try:
            conn.q("SET application_name = 'fulfillment-2'")
            conn.q("BEGIN")
            conn.q("SELECT 1")
            apps = [
                a
                for (a,) in su(
                    fresh,
                    "SELECT application_name FROM pg_stat_activity WHERE datname = 'shop' "
                    "AND state = 'idle in transaction' AND query LIKE %s",
                    f"%agent='{agent}'%",
                )
            ]
            conn.q("ROLLBACK")
        finally:
            conn.close()
        assert apps and all(a.startswith(agent) for a in apps), apps


# ================================================================ reloads revoke

ORDERS_READ = "SELECT id FROM orders WHERE id > $1 ORDER BY id"
NO_ORDERS = ("  orders:\n    ops: [select]\n", "")  # analytics loses orders


@pytest.mark.parametrize("how", ["RELOAD", "SIGHUP"])
def test_a_reload_stops_a_portal_already_half_read(fresh, record_proxy, how: str):
    proxy, _, policies = record_proxy
    with wire(proxy.port, f"analytics-rec-half-{uid()}") as agent:
        agent.q("BEGIN")
        first = agent.round(
            parse(b"s", ORDERS_READ, (20,)), bind(b"p", b"s", b"0"), execute(b"p", 1), SYNC
        )
        assert rows(first) == [["1"]], summary(first)
        with policy_changed(proxy, policies / "analytics.yaml", *NO_ORDERS, how=how):
            rest = agent.round(execute(b"p", 0), SYNC)
        agent.q("ROLLBACK")
    assert rows(rest) == [], f"{len(rows(rest))} rows of a revoked table after the reload"


def test_a_reload_stops_a_cursor_declared_in_the_transaction(fresh, record_proxy):
    proxy, _, policies = record_proxy
    with wire(proxy.port, f"analytics-rec-cur-{uid()}") as agent:
        agent.q("BEGIN")
        agent.q("DECLARE c NO SCROLL CURSOR FOR SELECT id FROM orders WHERE id > 0 ORDER BY id")
        assert rows(agent.q("FETCH 1 FROM c")) == [["1"]]
        agent.round(parse(b"", "FETCH 1 FROM c"), bind(b"fp", b""), SYNC)
        with policy_changed(proxy, policies / "analytics.yaml", *NO_ORDERS):
            simple = agent.q("FETCH ALL FROM c")
            moved = agent.q("MOVE BACKWARD 0 FROM c")
            portal = agent.round(execute(b"fp"), SYNC)
        agent.q("ROLLBACK")
    assert rows(simple) == [] and rows(portal) == [], (summary(simple), summary(portal))
    del moved


UPDATE_PARAM = "UPDATE orders SET fulfillment_status = 'packed' WHERE id = $1"
NO_UPDATE = (
    "ops: [select, update, delete]\n    update_columns: [fulfillment_status]\n",
    "ops: [select, delete]\n",
)


@pytest.mark.parametrize(
    "path", ["named statement", "bound portal", "sql prepare", "sql prepare in txn"]
)
def test_a_reload_revokes_a_write_prepared_before_it(fresh, record_proxy, path: str):
    proxy, _, policies = record_proxy
    with wire(proxy.port, f"support-rec-rw-{uid()}") as agent:
        if path == "named statement":
            agent.round(parse(b"u", UPDATE_PARAM, (20,)), SYNC)
        elif path == "bound portal":
            agent.q("BEGIN")
            agent.round(parse(b"u", UPDATE_PARAM, (20,)), bind(b"up", b"u", b"4"), SYNC)
        else:
            if path.endswith("txn"):
                agent.q("BEGIN")
            agent.q(f"PREPARE u AS {UPDATE_PARAM.replace('$1', '$1::bigint')}")
        with policy_changed(proxy, policies / "support.yaml", *NO_UPDATE):
            if path == "named statement":
                got = agent.round(bind(b"", b"u", b"4"), execute(), SYNC)
            elif path == "bound portal":
                got = agent.round(execute(b"up"), SYNC)
                agent.q("COMMIT")
            else:
                got = agent.q("EXECUTE u(4)")
                if path.endswith("txn"):
                    agent.q("COMMIT")
    assert status(fresh, 4) == ("pending", False), summary(got)


def test_a_reload_reaches_a_session_whose_agent_id_no_longer_matches(fresh, record_proxy):
    proxy, _, policies = record_proxy
    with wire(proxy.port, f"support-rec-gone-{uid()}") as agent:
        agent.round(parse(b"r", "SELECT id FROM orders WHERE id = $1", (20,)), SYNC)
        with policy_changed(
            proxy, policies / "support.yaml", 'agents: ["support-*"]', 'agents: ["support-ok-*"]'
        ):
            try:
                simple = agent.q("SELECT id FROM orders WHERE id = 1")
                extended = agent.round(bind(b"", b"r", b"1"), execute(), SYNC)
                write = agent.q("UPDATE orders SET fulfillment_status = 'packed' WHERE id = 4")
            except ConnectionError:
                return  # the session was ended: fine
    assert rows(simple) == [] and rows(extended) == [], (summary(simple), summary(extended))
    assert status(fresh, 4) == ("pending", False), summary(write)


def test_a_reload_adding_deny_columns_reaches_a_prepared_read(fresh, record_proxy):
    proxy, _, policies = record_proxy
    read = "SELECT email FROM customers WHERE id = $1"
    with wire(proxy.port, f"support-rec-cols-{uid()}") as agent:
        before = agent.round(parse(b"e", read, (20,)), bind(b"", b"e", b"1"), execute(), SYNC)
        assert rows(before) == [["ada@example.com"]], summary(before)
        agent.q("PREPARE e2 AS SELECT email FROM customers WHERE id = 2")
        with policy_changed(
            proxy,
            policies / "support.yaml",
            "  customers:\n    ops: [select]\n",
            "  customers:\n    ops: [select]\n    deny_columns: [email]\n",
        ):
            extended = agent.round(bind(b"", b"e", b"1"), execute(), SYNC)
            sql_level = agent.q("EXECUTE e2")
    assert "ada@example.com" not in str(rows(extended)), summary(extended)
    assert "grace@example.com" not in str(rows(sql_level)), summary(sql_level)


# ================================================================ the idempotency ledger


def keyed(key: str, reason: str) -> str:
    return (
        f"/* idempotency_key='{key}' */ INSERT INTO order_state_log "
        "(order_id, previous_status, new_status, changed_by, reason) "
        f"VALUES (4, 'pending', 'packed', 'rec', '{key}:{reason}')"
    )


def logged_rows(pg: PgCluster, key: str) -> list[str]:
    got = su(pg, "SELECT reason FROM order_state_log WHERE reason LIKE %s ORDER BY id", f"{key}:%")
    return [r.split(":", 1)[1] for (r,) in got]


def expire(pg: PgCluster, key: str) -> None:
    moved = su(
        pg,
        "UPDATE guardproxy.idempotency_keys SET expires_at = now() - interval '1 second', "
        "created_at = now() - interval '25 hours' WHERE key LIKE %s RETURNING 1",
        f"%{key}%",
    )
    assert moved, "the key is not in the ledger"


def test_an_expired_key_reclaimed_protects_again(fresh, record_proxy):
    proxy, _, _ = record_proxy
    agent = f"support-rec-idem-{uid()}"
    key = f"rec-key-{uid()}"
    try:
        with wire(proxy.port, agent) as conn:
            assert not errors(conn.q(keyed(key, "first")))
            assert not errors(conn.q(keyed(key, "first")))  # replayed
            assert logged_rows(fresh, key) == ["first"]
            expire(fresh, key)
            assert not errors(conn.q(keyed(key, "second")))  # an expired key may be claimed again
            conn.q(keyed(key, "second"))  # a retry: replayed
            refused = conn.q(keyed(key, "third"))  # same key, other statement: refused
            expire(fresh, key)
            conn.q(keyed(key, "first"))  # claimed a third time, with the first statement again
            conn.q(keyed(key, "first"))
            other = conn.q(keyed(key, "fourth"))
        assert "22023" in errors(refused) and "22023" in errors(other), (
            summary(refused),
            summary(other),
        )
        assert logged_rows(fresh, key) == ["first", "second", "first"]
    finally:
        su(fresh, "DELETE FROM order_state_log WHERE reason LIKE %s", f"{key}:%")


def test_an_expired_key_reclaimed_by_two_sessions_at_once_runs_once(fresh, record_proxy):
    proxy, _, _ = record_proxy
    agent = f"support-rec-idem2-{uid()}"
    key = f"rec-key2-{uid()}"
    try:
        with wire(proxy.port, agent) as conn:
            assert not errors(conn.q(keyed(key, "first")))
        expire(fresh, key)
        with wire(proxy.port, agent) as a, wire(proxy.port, agent) as b:
            a.q("BEGIN")
            b.q("BEGIN")
            from test_attack_relay import query

            a.send(query(keyed(key, "again")))
            b.send(query(keyed(key, "again")))
            time.sleep(0.5)
            a.until(b"Z")
            a.q("COMMIT")
            b.until(b"Z", timeout=15)
            b.q("COMMIT")
        assert logged_rows(fresh, key) == ["first", "again"]
    finally:
        su(fresh, "DELETE FROM order_state_log WHERE reason LIKE %s", f"{key}:%")


# ================================================================ undo of prepared deletes


def undo(pg: PgCluster, task: str) -> str:
    return gp("undo", "--task", task, "--yes", "--upstream", pg.dsn(dbname=SHOP_DB))


DELETE_PARAM = "DELETE FROM orders WHERE id = $1"


def _extended_then_set(agent: Any, task: str) -> None:
    agent.q("SET guard.task = 'rec-prepared-under'")
    agent.round(parse(b"d", DELETE_PARAM, (20,)), SYNC)
    agent.q(f"SET guard.task = '{task}'")
    agent.round(bind(b"", b"d", b"5"), execute(), SYNC)


def _portal_then_set(agent: Any, task: str) -> None:
    agent.q("BEGIN")
    agent.q("SET guard.task = 'rec-bound-under'")
    agent.round(parse(b"d", DELETE_PARAM, (20,)), bind(b"dp", b"d", b"5"), SYNC)
    agent.q(f"SET LOCAL guard.task = '{task}'")
    agent.round(execute(b"dp"), SYNC)
    agent.q("COMMIT")


def _sql_prepare_then_comment(agent: Any, task: str) -> None:
    agent.q("/* task='rec-prepare-under' */ PREPARE d(bigint) AS DELETE FROM orders WHERE id = $1")
    agent.q(f"/* task='{task}' */ EXECUTE d(5)")


def _sql_prepare_then_set(agent: Any, task: str) -> None:
    agent.q("SET guard.task = 'rec-prepare-under2'")
    agent.q("PREPARE d(bigint) AS DELETE FROM orders WHERE id = $1")
    agent.q(f"SET guard.task = '{task}'")
    agent.q("EXECUTE d(5)")


PREPARED_DELETES = {
    "extended, task set after Parse": _extended_then_set,
    "extended, portal bound before SET LOCAL": _portal_then_set,
    "sql prepare, task in the EXECUTE comment": _sql_prepare_then_comment,
    "sql prepare, task set before EXECUTE": _sql_prepare_then_set,
}


@pytest.mark.parametrize("path", sorted(PREPARED_DELETES))
def test_undo_restores_a_delete_under_the_context_it_executed_in(fresh, record_proxy, path: str):
    proxy, _, _ = record_proxy
    agent_id = f"support-rec-undo-{uid()}"
    task = f"rec-undo-{uid()}"
    with wire(proxy.port, agent_id) as agent:
        PREDELETE = status(fresh, 5)
        assert PREDELETE == ("pending", False)
        PREPARED_DELETES[path](agent, task)
    assert status(fresh, 5)[1], "the delete did not happen"
    audited = [
        e["task"]
        for e in events(fresh, agent_id)
        if "DELETE" in e["statement"].upper() or "EXECUTE" in e["statement"].upper()
    ]
    recorded = [
        t
        for (t,) in su(
            fresh, "SELECT task FROM guardproxy.deleted_rows WHERE agent_id = %s", agent_id
        )
    ]
    out = undo(fresh, task)
    assert status(fresh, 5) == ("pending", False), (audited, recorded, out)
    assert recorded == [task], (audited, recorded)


# ================================================================ operator tools and hostile text

HOSTILE = (
    "rec\x1b[2J\x1b]0;pwned\x07\u202eevil\r\nFORGED-LINE [/] [bold red]x[/bold red] "
    "\u2028y\x9b31m\u200fz\x08\x7f\u2066end"
)


def _plant_raw_rows(pg: PgCluster, marker: str) -> None:
    """Rows as an older writer (or any writer the sanitiser missed) may have left them."""
    su(
        pg,
        "INSERT INTO guardproxy.audit_events (agent_id, agent_type, task, step, statement, "
        "decision, rule, reason, rows, tags, outcome) VALUES (%s, 'support', %s, %s, %s, "
        "'denied', %s, %s, 1, %s, %s)",
        f"support-{marker}{HOSTILE}",
        marker,
        HOSTILE,
        f"SELECT 1 /* {HOSTILE} */\nFORGED-LINE",
        HOSTILE,
        HOSTILE,
        json.dumps({"trace": HOSTILE}),
        HOSTILE,
    )
    su(
        pg,
        "INSERT INTO guardproxy.audit_events (agent_id, agent_type, task, statement, decision, rows) "
        "VALUES (%s, 'support', %s, %s, 'allowed', 1)",
        f"support-{marker}",
        marker,
        f"UPDATE orders SET fulfillment_status = 'packed' WHERE id = 4 -- {HOSTILE}",
    )
    su(
        pg,
        "INSERT INTO guardproxy.deleted_rows (agent_id, task, step, reason, table_name, primary_key, "
        "row_image) VALUES (%s, %s, %s, %s, 'public.orders', '{\"id\": 6}', %s::jsonb)",
        f"support-{marker}",
        marker,
        HOSTILE,
        HOSTILE,
        '{"id": 6, "note": "\\u001b[2J\\u202e"}',
    )


CLI_VIEWS = [
    ("audit", "deletes", "--task", "{m}"),
    ("audit", "writes", "--task", "{m}"),
    ("audit", "denials", "--task", "{m}"),
    ("audit", "task", "{m}"),
    ("audit", "deletes", "--agent", "support-{m}"),
    ("undo", "--task", "{m}", "--dry-run"),
]


@pytest.mark.parametrize("layout", ["table", "records"])
@pytest.mark.parametrize("view", [" ".join(v) for v in CLI_VIEWS])
def test_the_audit_cli_prints_hostile_stored_text_as_data(fresh, view: str, layout: str):
    marker = f"rec-cli-{uid()}"
    _plant_raw_rows(fresh, marker)
    try:
        args = [a.format(m=marker) for a in view.split()]
        if args[0] == "audit":
            args += ["--layout", layout]
        out = gp(
            *args, "--upstream", fresh.dsn(dbname=SHOP_DB), columns=200 if layout == "table" else 60
        )
    finally:
        su(fresh, "DELETE FROM guardproxy.audit_events WHERE task = %s", marker)
        su(fresh, "DELETE FROM guardproxy.deleted_rows WHERE task = %s", marker)
    assert "Traceback" not in out, out[-3000:]
    assert marker in out, out[-2000:]
    assert raw_controls(out) == [], (raw_controls(out), out[-2000:])
    assert not any(line.lstrip(" |│").startswith("FORGED-LINE") for line in out.splitlines()), out


def test_the_audit_cli_prints_hostile_text_that_came_through_the_proxy(fresh, record_proxy):
    proxy, _, _ = record_proxy
    marker = f"rec-thru-{uid()}"
    agent = f"support-{marker}-\x1b[31m\u202e"
    with wire(proxy.port, agent) as conn:
        conn.q(f"SET guard.task = '{marker}'")
        conn.q("SET guard.reason = E'why\\x1b[2J\\u202e\\r\\nFORGED-LINE'")
        conn.q("SELECT card_last4 FROM payments /* \x1b]0;x\x07 */\r\nFORGED-LINE")
        conn.q("DELETE FROM orders WHERE id = 6")
    events(fresh, marker, 2)
    for view in ("audit task {m}", "audit deletes --task {m}", "audit denials --task {m}"):
        args = [a.format(m=marker) for a in view.split()]
        out = gp(*args, "--upstream", fresh.dsn(dbname=SHOP_DB), columns=80)
        assert "Traceback" not in out and raw_controls(out) == [], (view, raw_controls(out), out)
        assert not any(line.lstrip(" |│").startswith("FORGED-LINE") for line in out.splitlines())


def test_the_admin_console_shows_hostile_agent_text_as_data(fresh, record_proxy):
    proxy, _, _ = record_proxy
    agent = f"support-rec-adm-\x1b[2J\u202e\r\nFORGED\x9b{uid()}"
    with wire(proxy.port, agent) as conn:
        conn.q("SET guard.task = E'task\\x1b]0;t\\x07\\u2028\\u202e'")
        conn.q("SELECT 1")
        texts = []
        for view in ("SHOW CLIENTS", "SHOW AGENTS", "SHOW SERVERS", "SHOW STATS", "SHOW POOLS"):
            texts.append(str(admin(proxy, view)))
    joined = "\n".join(texts)
    assert "rec-adm" in joined
    assert raw_controls(joined.replace("\n", "")) == [], raw_controls(joined)
    top = subprocess.run(
        [sys.executable, "-m", "guardproxy", "top", "--dsn",
         f"postgresql://admin@127.0.0.1:{proxy.port}/guardproxy", "--iterations", "1"],
        capture_output=True, cwd=ROOT, timeout=60, check=False,
        env=dict(os.environ, COLUMNS="200", TERM="dumb"),
    )  # fmt: skip
    shown = (top.stdout + top.stderr).decode("utf-8", errors="surrogateescape")
    assert "Traceback" not in shown, shown[-2000:]
    assert "\x1b[2J" not in shown and "\u202e" not in shown and "\x9b" not in shown, shown[-2000:]


# ================================================================ credentials on operator screens

DSNS = {
    "uri": "postgresql://app_owner:S3CRET-a@127.0.0.1:{port}/shop",
    "uri with unencoded @ and :": "postgresql://app_owner:S3CR@T:-b@127.0.0.1:{port}/shop",
    "percent-encoded password": "postgresql://app_owner:S3CRET%2Dc%40x@127.0.0.1:{port}/shop",
    "password query parameter": "postgresql://app_owner@127.0.0.1:{port}/shop?password=S3CRET-d",
    "percent-encoded key": "postgresql://app_owner@127.0.0.1:{port}/shop?sslmode=disable&pass%77ord=S3CRET-e",
    "sslpassword": "postgresql://app_owner@127.0.0.1:{port}/shop?sslpassword=S3CRET-f&sslmode=disable",
    "secret with & inside": "postgresql://app_owner@127.0.0.1:{port}/shop?password=S3CRET-g&x&sslmode=disable",
    "multi-host": "postgresql://app_owner:S3CRET-h@127.0.0.1:{port},127.0.0.1:{port}/shop",
    "uppercase scheme": "POSTGRESQL://app_owner:S3CRET-i@127.0.0.1:{port}/shop",
    "keyword": "host=127.0.0.1 port={port} dbname=shop user=app_owner password=S3CRET-j",
    "keyword quoted with escapes": "host=127.0.0.1 port={port} dbname=shop user=app_owner password = 'it\\'s S3CRET-k'",
    "keyword backslash-escaped space": "host=127.0.0.1 port={port} dbname=shop user=app_owner password=a\\ S3CRET-l",
    "keyword newline separated": "host=127.0.0.1\nport={port}\ndbname=shop\nuser=app_owner\npassword=S3CRET-m",
    "keyword tab before =": "host=127.0.0.1 port={port} dbname=shop user=app_owner password\t=\tS3CRET-n",
    "nested dbname": "dbname='postgresql://app_owner:S3CRET-o@127.0.0.1:{port}/shop' host=127.0.0.1 port={port}",
    "password in fragment-looking userinfo": "postgresql://app_owner:S3#CRET-p@127.0.0.1:{port}/shop",
    "password with slash": "postgresql://app_owner:S3/CRET-q@127.0.0.1:{port}/shop",
}


def _secret_of(case: str, dsn: str) -> list[str]:
    tail = dsn.split("S3", 1)[1]
    letter = re.search(r"(?:-|%2D)([a-z])", tail)
    assert letter
    return ["S3CRET-" + letter.group(1), "CRET-" + letter.group(1), "CRET%2D" + letter.group(1)]


@contextlib.contextmanager
def bare_proxy(
    upstream: str, log: Path, **settings: Any
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    args = ["serve", "--upstream", upstream, "--listen-port", str(port), "--admin-users", "admin",
            "--log-level", "debug"]  # fmt: skip
    for key, value in settings.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARDPROXY_")}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "guardproxy", *args], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            time.sleep(0.1)
        yield port, proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.parametrize("case", sorted(DSNS))
def test_show_config_and_logs_never_show_an_upstream_password(shop_restored, tmp_path, case: str):
    dsn = DSNS[case].format(port=shop_restored.port)
    secrets = _secret_of(case, dsn)
    log = tmp_path / "guardproxy.log"
    shown = ""
    with bare_proxy(dsn, log) as (port, proc):
        if proc.poll() is None:
            admin_dsn = f"postgresql://admin@127.0.0.1:{port}/guardproxy"
            with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as conn:
                shown = str(conn.execute("SHOW CONFIG").fetchall())
                shown += str(conn.execute("SHOW POOLS").fetchall())
                shown += str(conn.execute("SHOW SERVERS").fetchall())
            assert "***" in shown, shown  # the DSN is shown, masked
            # an agent's session makes the proxy log in upstream (and fail: wrong password)
            with (
                contextlib.suppress(psycopg.Error),
                psycopg.connect(
                    f"postgresql://agent-1@127.0.0.1:{port}/shop", connect_timeout=5
                ) as c,
            ):
                c.execute("SELECT 1")
    text = shown + log.read_text(errors="replace")
    for secret in secrets:
        assert secret not in text, (
            secret,
            [line for line in text.splitlines() if secret in line][:3],
        )


# ================================================================ before authentication

PASSWORDS = {"agent-a": "right-a", "ops": "right-ops"}


@pytest.fixture(scope="module")
def scram_proxy(pg: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from wirekit import launched_proxy

    from guardproxy.protocol.scram import write_verifier

    directory = tmp_path_factory.mktemp("attack-record-scram")
    auth_file = directory / "agents.auth"
    for agent, password in PASSWORDS.items():
        write_verifier(auth_file, agent, password)
    with launched_proxy(
        pg,
        directory,
        auth_mode="scram",
        auth_file=auth_file,
        auth_max_failures=2,
        admin_users="ops",
        max_pending_logins=4,
        max_client_conn=3,
        client_startup_timeout=2,
        client_login_timeout=3,
    ) as handle:
        yield handle


def _login(proxy: Any, agent: str, dbname: str = "app") -> None:
    dsn = proxy.dsn(agent, PASSWORDS[agent], dbname=dbname)
    with psycopg.connect(dsn, connect_timeout=5, autocommit=True) as conn:
        conn.execute("SHOW STATS" if dbname == "guardproxy" else "SELECT 1").fetchall()


def _raw_from(port: int, source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT, source_address=(source, 0))
    return sock


def _read_some(sock: socket.socket) -> bytes:
    with contextlib.suppress(OSError):
        return sock.recv(65536)
    return b""


def _aborted_login(port: int, source: str, agent: str, how: str) -> None:
    """A login of ``agent`` from ``source`` that never finishes properly."""

    sock = _raw_from(port, source)
    sock.settimeout(1.0)
    try:
        _abort(sock, agent, how)
    except OSError:
        pass  # the proxy hung up first
    finally:
        sock.close()


def _abort(sock: socket.socket, agent: str, how: str) -> None:
    from guardproxy.protocol import codec

    sock.sendall(codec.build_startup({"user": agent, "database": "app"}))
    _read_some(sock)  # AuthenticationSASL
    if how == "bad mechanism":
        sock.sendall(codec.build_sasl_initial("SCRAM-SHA-1", b"n,,n=x,r=abc"))
    elif how == "malformed client-first":
        sock.sendall(codec.build_sasl_initial("SCRAM-SHA-256", b"\xff\x00garbage"))
    elif how == "channel binding claimed":
        sock.sendall(codec.build_sasl_initial("SCRAM-SHA-256", b"p=tls-server-end-point,,n=,r=abc"))
    elif how == "bogus final":
        sock.sendall(codec.build_sasl_initial("SCRAM-SHA-256", b"n,,n=,r=abcdefgh"))
        _read_some(sock)
        sock.sendall(codec.build_password(b"c=biws,r=abcdefghX,p=AAAA"))
    elif how == "hang up":
        return
    _read_some(sock)


@pytest.mark.parametrize(
    "how",
    [
        "bad mechanism",
        "malformed client-first",
        "channel binding claimed",
        "bogus final",
        "hang up",
    ],
)
def test_aborted_logins_from_other_addresses_do_not_lock_out_the_agent(scram_proxy, how: str):
    for n in range(2, 8):
        for _ in range(4):
            for agent in ("agent-a", "ops"):
                _aborted_login(scram_proxy.port, f"127.0.1.{n}", agent, how)
    _login(scram_proxy, "agent-a")
    _login(scram_proxy, "ops", "guardproxy")


def test_trickling_and_stalled_logins_do_not_keep_the_agent_out(scram_proxy):
    from guardproxy.protocol import codec

    port = scram_proxy.port
    packet = codec.build_startup({"user": "agent-a", "database": "app"})
    socks: list[socket.socket] = []
    try:
        for round_ in range(3):
            for n in range(8):  # stalled inside SCRAM: startup sent, nothing more
                sock = _raw_from(port, f"127.0.2.{n + 2}")
                sock.sendall(packet)
                socks.append(sock)
            for n in range(8):  # trickling the startup packet, a byte at a time
                sock = _raw_from(port, f"127.0.3.{n + 2}")
                sock.sendall(packet[:1])
                socks.append(sock)
            for i in range(4):
                for sock in socks[-8:]:
                    with contextlib.suppress(OSError):
                        sock.sendall(packet[1 + i : 2 + i])
                time.sleep(0.1)
            started = time.monotonic()
            _login(scram_proxy, "agent-a")
            _login(scram_proxy, "ops", "guardproxy")
            assert time.monotonic() - started < 5, round_
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize(
    "field,value",
    [
        ("user", "x\r2026-12-06 INFO guardproxy: forged-cr"),
        ("user", "x\u20282026-12-06 INFO guardproxy: forged-ls"),
        ("user", "x\u00852026-12-06 INFO guardproxy: forged-nel"),
        ("database", "x\n2026-12-06 INFO guardproxy: forged-db"),
        ("application_name", "x\n2026-12-06 INFO guardproxy: forged-app"),
        ("options", "-c x=\n2026-12-06 INFO guardproxy: forged-opt"),
    ],
)
def test_startup_text_cannot_forge_a_log_line(scram_proxy, field: str, value: str):
    from guardproxy.protocol import codec

    params = {"user": "agent-a", "database": "app", field: value}
    sock = _raw_from(scram_proxy.port, "127.0.4.2")
    try:
        sock.sendall(codec.build_startup(params))
        _read_some(sock)
    finally:
        sock.close()
    time.sleep(0.3)
    log = scram_proxy.log_path.read_bytes().decode("utf-8", errors="replace")
    marker = value.split("guardproxy: ")[1]
    for line in re.split("[\r\n\u2028\u2029\u0085\x0b\x0c]", log):
        assert not line.startswith("2026-12-06 INFO guardproxy: " + marker), line


# ================================================================ every write path on record, every delete undoable

WRITE_PATHS = {
    "writable cte in a select": (
        "WITH u AS (UPDATE orders SET fulfillment_status = 'packed' WHERE id = 4 RETURNING id) "
        "SELECT id FROM u"
    ),
    "explain analyze": "EXPLAIN ANALYZE UPDATE orders SET fulfillment_status = 'packed' WHERE id = 4",
    "merge update": (
        "MERGE INTO orders o USING (VALUES (4)) AS v(id) ON o.id = v.id "
        "WHEN MATCHED THEN UPDATE SET fulfillment_status = 'packed'"
    ),
    "update from": (
        "UPDATE orders o SET fulfillment_status = 'packed' FROM customers c "
        "WHERE c.id = o.customer_id AND o.id = 4"
    ),
    "in a committed transaction": "BEGIN; UPDATE orders SET fulfillment_status = 'packed' WHERE id = 4; COMMIT",
    "update returning": "UPDATE orders SET fulfillment_status = 'packed' WHERE id = 4 RETURNING id",
}


@pytest.mark.parametrize("how", ["simple", "extended"])
@pytest.mark.parametrize("path", sorted(WRITE_PATHS))
def test_every_write_path_is_on_record(fresh, record_proxy, path: str, how: str):
    proxy, _, _ = record_proxy
    agent = f"support-rec-path-{uid()}"
    sql = WRITE_PATHS[path]
    with wire(proxy.port, agent) as conn:
        if how == "simple" or ";" in sql:
            got = conn.q(sql)
        else:
            got = conn.round(parse(b"", sql), bind(b"", b""), execute(b"", 1), SYNC)
    if status(fresh, 4) != ("packed", False):
        assert errors(got), summary(got)
        return
    mine = [e for e in events(fresh, agent) if e["decision"] != "denied"]
    assert any(e["rows"] == 1 and "orders" in e["statement"] for e in mine), (summary(got), mine)


DELETE_PATHS = {
    "writable cte": "WITH d AS (DELETE FROM orders WHERE id = 5 RETURNING id) SELECT id FROM d",
    "delete using": "DELETE FROM orders o USING customers c WHERE c.id = o.customer_id AND o.id = 5",
    "merge delete": (
        "MERGE INTO orders o USING (VALUES (5)) AS v(id) ON o.id = v.id WHEN MATCHED THEN DELETE"
    ),
    "delete returning": "DELETE FROM orders WHERE id = 5 RETURNING *",
    "delete in subquery": "DELETE FROM orders WHERE id IN (SELECT 5)",
    "explain analyze": "EXPLAIN ANALYZE DELETE FROM orders WHERE id = 5",
    "where current of": "BEGIN; DECLARE dc CURSOR FOR SELECT id FROM orders WHERE id = 5; "
    "FETCH 1 FROM dc; DELETE FROM orders WHERE CURRENT OF dc; COMMIT",
}


@pytest.mark.parametrize("path", sorted(DELETE_PATHS))
def test_every_delete_path_is_soft_recorded_and_undone(fresh, record_proxy, path: str):
    proxy, _, _ = record_proxy
    agent = f"support-rec-dpath-{uid()}"
    task = f"rec-dpath-{uid()}"
    with wire(proxy.port, agent) as conn:
        conn.q(f"SET guard.task = '{task}'")
        got = conn.q(DELETE_PATHS[path])
        conn.q("ROLLBACK")
    present = su(fresh, "SELECT count(*) FROM orders WHERE id = 5")[0][0]
    assert present == 1, f"order 5 was deleted for good: {summary(got)}"
    if not status(fresh, 5)[1]:
        assert errors(got), summary(got)
        return
    out = undo(fresh, task)
    assert status(fresh, 5) == ("pending", False), (summary(got), out)


# ================================================================ findings (fixed)


def test_a_flood_of_denials_does_not_cost_another_agent_its_write_events(shop_restored, tmp_path):
    import threading

    metrics_port = free_port()
    with launch_proxy(
        shop_restored,
        tmp_path / "guardproxy.log",
        policies=policies_with(tmp_path),
        metrics_port=metrics_port,
    ) as proxy:
        other = f"fulfillment-rec-flood-{uid()}"
        per_conn = 30000
        blast = b"".join(
            parse(b"", f"SELECT card_last4 FROM payments WHERE id = {n}") + SYNC
            for n in range(per_conn)
        )
        finished: list[int] = []

        floods = [Wire(proxy.port, f"analytics-rec-flood-{k}") for k in range(2)]

        def flood(conn: Wire) -> None:
            conn.send(blast)
            finished.append(len(conn.until(b"Z", count=per_conn, timeout=150)))

        threads = [threading.Thread(target=flood, args=(c,)) for c in floods]
        writes = 0
        with proxy.connect(other, autocommit=True) as conn:
            conn.execute("UPDATE orders SET tracking_number = 'TRK-flood-start' WHERE id = 3")
            writes += 1
            for thread in threads:
                thread.start()
            while any(t.is_alive() for t in threads) or writes < 20:
                conn.execute(
                    f"UPDATE orders SET tracking_number = 'TRK-flood-{writes}' WHERE id = 3"
                )
                writes += 1
        for thread in threads:
            thread.join(160)
        for c in floods:
            c.close()
        deadline = time.monotonic() + 30
        while True:  # the queue drains; wait (bounded) for the events still in it
            recorded = len(events(shop_restored, other, writes))
            if recorded == writes or time.monotonic() > deadline:
                break
        lost = [
            line
            for line in metrics_text(metrics_port).splitlines()
            if line.startswith("guardproxy_audit_events_lost")
        ]
    su(
        shop_restored,
        "UPDATE orders SET tracking_number = NULL WHERE id = 3 AND tracking_number LIKE 'TRK-flood-%%'",
    )
    assert len(finished) == 2, finished  # the flood ran to its end
    assert recorded == writes, f"{writes} committed writes, {recorded} audit events; {lost}"


ANALYTICS_LIMITS = "  max_rows_returned: 1000     # a read is cut at 1000 rows, with a WARNING\n"
ROW_FILTER = (
    "functions:\n",
    'row_filters:\n  orders: "customer_id = 1"\n\nfunctions:\n',
)
NARROWINGS = {
    "row filter added": ROW_FILTER,
    "row cap lowered to 2": (ANALYTICS_LIMITS, "  max_rows_returned: 2\n"),
    "column denied": ("    deny_columns: [email]\n", "    deny_columns: [email, name]\n"),
}
ALLOWED_AFTER = {  # what the narrowed policy lets through, given what was read before
    "row filter added": lambda got: all(r[0] in ("1", "2") for r in got),
    "row cap lowered to 2": lambda got: len(got) <= 1,
    "column denied": lambda got: got == [],
}
READS = {
    "row filter added": "SELECT id FROM orders WHERE id > 0 ORDER BY id",
    "row cap lowered to 2": "SELECT id FROM orders WHERE id > 0 ORDER BY id",
    "column denied": "SELECT name FROM customers WHERE id > 0 ORDER BY id",
}


@pytest.mark.parametrize("narrowing", sorted(NARROWINGS))
@pytest.mark.parametrize(
    "holder", ["cursor with hold", "cursor in transaction", "suspended portal"]
)
def test_a_reload_narrowing_reaches_reads_already_open(
    fresh, record_proxy, narrowing: str, holder: str
):
    proxy, _, policies = record_proxy
    read = READS[narrowing]
    with wire(proxy.port, f"analytics-rec-narrow-{uid()}") as agent:
        if holder == "cursor with hold":
            agent.q("BEGIN")
            agent.q(f"DECLARE c CURSOR WITH HOLD FOR {read}")
            agent.q("COMMIT")
            first = agent.q("FETCH 1 FROM c")
        elif holder == "cursor in transaction":
            agent.q("BEGIN")
            agent.q(f"DECLARE c CURSOR FOR {read}")
            first = agent.q("FETCH 1 FROM c")
        else:
            agent.q("BEGIN")
            first = agent.round(parse(b"", read), bind(b"p", b""), execute(b"p", 1), SYNC)
        assert len(rows(first)) == 1, summary(first)
        with policy_changed(proxy, policies / "analytics.yaml", *NARROWINGS[narrowing]):
            if holder == "suspended portal":
                rest = agent.round(execute(b"p", 0), SYNC)
            else:
                rest = agent.q("FETCH ALL FROM c")
        agent.q("ROLLBACK")
        agent.q("CLOSE ALL")
    assert ALLOWED_AFTER[narrowing](rows(rest)), f"after the reload: {summary(rest)}"


@pytest.mark.parametrize(
    "channel",
    [
        (
            {},
            [
                "/* guardproxy.altered='event',agent='fulfillment-1',agent_type='fulfillment' */ "
                + WRITE
            ],
        ),
        (
            {},
            [
                "SET \"guard.guardproxy.altered\" = 'event'",
                "SET guard.agent_type = 'fulfillment'",
                WRITE,
            ],
        ),
        ({}, ["SET guard.agent = 'fulfillment-1'", "SET guard.agent_id = 'fulfillment-1'", WRITE]),
        ({"options": "-c guard.guardproxy.altered=event -c guard.agent_type=fulfillment"}, [WRITE]),
    ],
    ids=["comment", "set", "set agent", "options"],
)
def test_an_agent_cannot_forge_who_wrote_or_a_writer_placeholder(fresh, record_proxy, channel):
    proxy, _, _ = record_proxy
    params, stmts = channel
    agent = f"support-rec-forge-{uid()}"
    try:
        _send_write(proxy, agent, params, stmts)
    except ConnectionError:
        return
    events(fresh, agent, 1)  # waits (bounded) for the writer
    stored = su(
        fresh,
        "SELECT agent_id, agent_type, coalesce(tags::text, '') FROM guardproxy.audit_events "
        "WHERE agent_id LIKE %s OR tags::text LIKE %s OR agent_id LIKE 'fulfillment-1%%' AND at > now() - interval '5 s'",
        agent + "%",
        "%" + agent + "%",
    )
    assert status(fresh, 4) != ("packed", False) or stored, "a write without its event"
    for agent_id, agent_type, tagtext in stored:
        assert (agent_id, agent_type) == (agent, "support"), stored
        assert '"guardproxy.altered": "event"' not in tagtext, stored


def test_fail_closed_never_acknowledges_a_write_unrecorded_during_another_agents_flood(
    shop_restored, tmp_path
):
    """With ``audit: {on_loss: fail_closed}`` the flood may refuse support's writes, but every
    write that was acknowledged (an order_state_log row) has its event."""
    import threading

    policies = policies_with(tmp_path, support={"audit": {"on_loss": "fail_closed"}})
    with launch_proxy(shop_restored, tmp_path / "guardproxy.log", policies=policies) as proxy:
        writer = f"support-rec-fc-{uid()}"
        per_conn = 30000
        blast = b"".join(
            parse(b"", f"SELECT card_last4 FROM payments WHERE id = {n}") + SYNC
            for n in range(per_conn)
        )
        floods = [Wire(proxy.port, f"analytics-rec-fc-{k}") for k in range(2)]

        def flood(conn: Wire) -> None:
            conn.send(blast)
            with contextlib.suppress(TimeoutError, ConnectionError):
                conn.until(b"Z", count=per_conn, timeout=150)

        threads = [threading.Thread(target=flood, args=(c,)) for c in floods]
        acknowledged: list[str] = []
        with proxy.connect(writer, autocommit=True) as conn:
            for thread in threads:
                thread.start()
            n = 0
            while any(t.is_alive() for t in threads) or n < 20:
                reason = f"{writer}:{n}"
                n += 1
                try:
                    conn.execute(
                        "INSERT INTO order_state_log (order_id, previous_status, new_status, changed_by, "
                        f"reason) VALUES (4, 'pending', 'packed', 'rec', '{reason}')"
                    )
                    acknowledged.append(reason)
                except psycopg.Error:
                    pass
        for thread in threads:
            thread.join(160)
        for c in floods:
            c.close()
        stored_rows = [
            r
            for (r,) in su(
                shop_restored,
                "SELECT reason FROM order_state_log WHERE reason LIKE %s",
                writer + ":%",
            )
        ]
        deadline = time.monotonic() + 30
        while True:
            recorded = [
                e
                for e in events(shop_restored, writer, len(stored_rows))
                if e["decision"] != "denied"
            ]
            if len(recorded) >= len(stored_rows) or time.monotonic() > deadline:
                break
    su(shop_restored, "DELETE FROM order_state_log WHERE reason LIKE %s", writer + ":%")
    assert sorted(stored_rows) == sorted(acknowledged)
    assert len(recorded) == len(stored_rows), (
        f"{len(stored_rows)} rows written, {len(recorded)} events"
    )


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET /metrics?x=<script>\x1b[2J HTTP/1.1",
        b"GET /\x1b]0;pwned\x07<b>x</b> HTTP/1.1",
        b"POST /metrics HTTP/1.1",
        b"GET /readyz HTTP/1.1\r\nX-Forged: \xe2\x80\xae<svg onload=1>",
    ],
)
def test_the_http_port_echoes_nothing(record_proxy, request_line: bytes):
    _, metrics_port, _ = record_proxy
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=WAIT) as sock:
        sock.sendall(request_line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    head = answer.partition(b"\r\n\r\n")[0]
    for needle in (b"<script>", b"\x1b", b"<b>", b"<svg", b"\xe2\x80\xae", b"pwned"):
        assert needle not in answer, answer[:500]
    assert b"text/html" not in head.lower(), head


def test_a_steady_trickle_of_new_silent_connections_does_not_evict_logins(scram_proxy):
    """50 new silent connections a second (more than max_pending_logins = 4 in the time a
    login takes): the agent and the admin still log in."""
    import threading

    stop = threading.Event()
    socks: list[socket.socket] = []

    def trickle() -> None:
        n = 0
        while not stop.is_set():
            with contextlib.suppress(OSError):
                socks.append(_raw_from(scram_proxy.port, f"127.0.5.{2 + n % 200}"))
            n += 1
            time.sleep(0.02)

    thread = threading.Thread(target=trickle)
    thread.start()
    failures: list[str] = []
    try:
        time.sleep(0.5)
        for _ in range(5):
            for agent, db in (("agent-a", "app"), ("ops", "guardproxy")):
                try:
                    _login(scram_proxy, agent, db)
                except psycopg.Error as exc:
                    failures.append(f"{agent}: {exc}")
    finally:
        stop.set()
        thread.join(10)
        for sock in socks:
            sock.close()
    assert failures == [], failures
