"""Shared pieces of the proof tests (issue 6): load, faults and hostile input.

* `policies_with`: a copy of the example policies with some keys changed (pool and
  session limits for 1,000 clients, short timeouts, ``audit.on_loss``), written to a
  temporary directory; the agent roles of the shop database stay valid because the
  tables and operations are the example ones.
* `launch`: ``guardproxy serve`` in front of the shop database (shop.launch_proxy),
  optionally with extra environment variables (the crash hook); prints the proxy's log
  when the body fails, and fails if the log shows an unhandled exception.
* `AgentConn`: one psycopg async connection of an agent that remembers the NOTICEs of
  its last statement, so a replayed write can be told from an executed one.
* `Outcomes`: what clients saw (statements, executions, replays, errors by SQLSTATE)
  and which idempotency keys were acknowledged, for the ledger check.
* `ledger_vs_rows` / `assert_ledger_matches`: the guardproxy.idempotency_keys ledger and
  order_state_log compared key by key.
* `metric`, `rss_kb`: the proxy's /metrics and its resident memory.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import yaml
from pgcluster import PgCluster
from shop import POLICIES, SHOP_DB, ShopProxy, launch_proxy

IO_TIMEOUT = 10


# ---------------------------------------------------------------- policies


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def policies_with(directory: Path, **changes: dict[str, Any]) -> Path:
    """The example policies copied to ``directory``, with ``changes`` per agent type
    (``support={"limits": {...}}``) merged in key by key."""
    target = directory / "policies"
    shutil.copytree(POLICIES, target)
    for agent_type, change in changes.items():
        path = target / f"{agent_type}.yaml"
        doc = yaml.safe_load(path.read_text())
        path.write_text(yaml.safe_dump(_merge(doc, change), sort_keys=False))
    return target


def policy_doc(policies: Path, agent_type: str) -> dict[str, Any]:
    return dict(yaml.safe_load((policies / f"{agent_type}.yaml").read_text()))


def require_idempotency(policies: Path, agent_type: str = "support") -> None:
    """The tests of exactly-once writes need the policy to honour idempotency keys."""
    mode = (policy_doc(policies, agent_type).get("idempotency") or {}).get("mode", "off")
    assert mode in ("explicit", "derived"), (
        f"policies/{agent_type}.yaml has idempotency mode {mode!r}: the proxy ignores "
        "idempotency keys of this agent type, so retried writes cannot be exactly-once "
        "(issue 4: the support policy gets `idempotency`)"
    )


def audit_fail_closed(policies: Path, agent_type: str = "support") -> bool:
    audit = policy_doc(policies, agent_type).get("audit") or {}
    return audit.get("on_loss") == "fail_closed"


# ---------------------------------------------------------------- proxies


@contextlib.contextmanager
def patched_env(env: dict[str, str] | None) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def launch(
    pg: PgCluster,
    log_path: Path,
    policies: Path,
    env: dict[str, str] | None = None,
    **settings: Any,
) -> Iterator[ShopProxy]:
    """shop.launch_proxy, with ``env`` added to the proxy's environment (it copies os.environ)."""
    with contextlib.ExitStack() as stack:
        with patched_env(env):
            proxy = stack.enter_context(launch_proxy(pg, log_path, policies=policies, **settings))
        try:
            yield proxy
        except BaseException:
            print_log_tail(proxy)
            raise
        assert_no_tracebacks(proxy)


def assert_no_tracebacks(proxy: ShopProxy) -> None:
    """An exception nobody handled inside the proxy shows as a traceback in its log."""
    log = proxy.log()
    assert "Traceback" not in log, f"guardproxy logged an unhandled exception:\n{log[-6000:]}"


def print_log_tail(proxy: ShopProxy, title: str = "guardproxy log", chars: int = 6000) -> None:
    print(f"\n----- {title} ({' '.join(proxy.args)}) -----\n{proxy.log()[-chars:]}")


def metric(port: int, name: str) -> float:
    """Sum of every sample of ``name`` (counters: ``name_total``) on the proxy's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=IO_TIMEOUT) as resp:
        text = resp.read().decode()
    pattern = re.compile(rf"^{re.escape(name)}(?:_total)?(?:\{{[^}}]*\}})? (\S+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def superuser(pg: PgCluster, autocommit: bool = True) -> psycopg.Connection[Any]:
    return psycopg.connect(
        pg.dsn("postgres", dbname=SHOP_DB), autocommit=autocommit, connect_timeout=IO_TIMEOUT
    )


# ---------------------------------------------------------------- agents' writes


def keyed_insert(key: str, agent: str, order_id: int, reason: str = "proof") -> str:
    """A support write carrying its idempotency key twice: as the sqlcommenter tag the
    proxy reads, and in the row (order_state_log.idempotency_key) so rows can be matched
    to the ledger."""
    return (
        f"/* idempotency_key='{key}' */ INSERT INTO order_state_log "
        "(order_id, previous_status, new_status, changed_by, reason, idempotency_key) "
        f"VALUES ({order_id}, 'pending', 'packed', '{agent}', '{reason}', '{key}')"
    )


class AgentConn:
    """A psycopg async connection of one agent; keeps the notices of its last statement."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], agent: str) -> None:
        self.conn = conn
        self.agent = agent
        self.notices: list[str] = []
        conn.add_notice_handler(lambda diag: self.notices.append(diag.message_primary or ""))

    @classmethod
    async def open(cls, dsn: str, agent: str) -> AgentConn:
        conn = await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, connect_timeout=IO_TIMEOUT
        )
        # Every statement goes as a simple Query, also the fifth retry of one text (psycopg
        # would prepare it): a retry then reaches the proxy exactly as the first attempt.
        # test_faults.py checks a retry sent as a prepared statement on its own.
        conn.prepare_threshold = None
        return cls(conn, agent)

    @property
    def usable(self) -> bool:
        return not self.conn.closed and not self.conn.broken

    async def run(self, sql: str) -> tuple[str, list[tuple[Any, ...]]]:
        """Runs ``sql``; (command tag, rows). Raises psycopg.Error as the client sees it."""
        self.notices.clear()
        cur = await self.conn.execute(sql)
        rows = await cur.fetchall() if cur.description is not None else []
        return cur.statusmessage or "", rows

    @property
    def replayed(self) -> bool:
        return any("replayed" in n for n in self.notices)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.conn.close()


@dataclass
class Outcomes:
    """What the clients saw, and the keys the proxy acknowledged."""

    statements: int = 0
    reads: int = 0
    executed: int = 0  # writes acknowledged as run
    replayed: int = 0  # writes acknowledged from the ledger
    wrong_answers: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)
    acked: dict[str, str] = field(default_factory=dict)  # key -> agent
    executions: Counter[str] = field(default_factory=Counter)  # key -> times run (not replayed)
    unacked: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (agent, sql)
    last_message: str = ""  # of the last error

    def error(self, exc: psycopg.Error) -> str:
        """Counts an error by SQLSTATE. A connection that broke under the client (no
        ErrorResponse, so no SQLSTATE) counts as 08006 connection_failure, as libpq says."""
        code = exc.sqlstate or ("08006" if isinstance(exc, psycopg.OperationalError) else "?")
        self.errors[code] += 1
        self.last_message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        self.samples.setdefault(code, self.last_message)
        return code

    async def write(self, agent: AgentConn, key: str, sql: str) -> str | None:
        """One attempt of a keyed write; None when acknowledged, else the SQLSTATE."""
        self.statements += 1
        try:
            tag, _ = await agent.run(sql)
        except psycopg.Error as exc:
            self.unacked[key] = (agent.agent, sql)
            return self.error(exc)
        if tag != "INSERT 0 1":
            self.wrong_answers.append(f"{key}: tag {tag!r}")
        if agent.replayed:
            self.replayed += 1
        else:
            self.executed += 1
            self.executions[key] += 1
        self.acked[key] = agent.agent
        self.unacked.pop(key, None)
        return None

    def summary(self) -> str:
        errors = ", ".join(f"{code} x{n}" for code, n in sorted(self.errors.items())) or "none"
        return (
            f"statements {self.statements} (reads {self.reads}, writes run {self.executed}, "
            f"writes replayed {self.replayed}); errors by SQLSTATE: {errors}"
        )


def ledger_vs_rows(pg: PgCluster, prefix: str) -> tuple[dict[str, tuple[str, str]], Counter[str]]:
    """Ledger entries (agent's key -> (command tag, agent id)) and rows per key, for the keys
    starting with ``prefix``. The proxy may store a key under a namespace of its own
    (``explicit:<agent type>:<key>``): the agent's key is what follows it."""
    with superuser(pg) as conn:
        ledger = {
            key[key.index(prefix) :]: (tag or "", agent)
            for key, tag, agent in conn.execute(
                "SELECT key, command_tag, agent_id FROM guardproxy.idempotency_keys "
                "WHERE key LIKE %s",
                ("%" + prefix + "%",),
            )
        }
        rows: Counter[str] = Counter(
            {
                key: n
                for key, n in conn.execute(
                    "SELECT idempotency_key, count(*) FROM order_state_log "
                    "WHERE idempotency_key LIKE %s GROUP BY 1",
                    (prefix + "%",),
                )
            }
        )
    return ledger, rows


def assert_ledger_matches(pg: PgCluster, prefix: str, outcomes: Outcomes) -> tuple[int, int]:
    """Every acknowledged key is in the ledger and in exactly one row; nothing else is.

    Returns (keys, rows). Keys never acknowledged may have run (a fault between commit
    and reply): then they too must be in the ledger and in exactly one row.
    """
    ledger, rows = ledger_vs_rows(pg, prefix)
    acked = set(outcomes.acked)
    lost = sorted(acked - set(rows))
    doubled = sorted(k for k, n in rows.items() if n != 1)
    run_twice = sorted(k for k, n in outcomes.executions.items() if n > 1)
    without_ledger = sorted(set(rows) - set(ledger))
    ledger_without_row = sorted(set(ledger) - set(rows))
    unexpected = sorted(set(rows) - acked - set(outcomes.unacked))
    assert not lost, f"{len(lost)} acknowledged writes are not in the table: {lost[:10]}"
    assert not doubled, f"{len(doubled)} keys have more than one row: {doubled[:10]}"
    assert not run_twice, f"{len(run_twice)} keys were acknowledged as run twice: {run_twice[:10]}"
    assert not without_ledger, (
        f"{len(without_ledger)} rows written with a key have no ledger entry "
        f"(the proxy did not record the key): {without_ledger[:10]}"
    )
    assert not ledger_without_row, (
        f"{len(ledger_without_row)} ledger keys have no row: {ledger_without_row[:10]}"
    )
    assert not unexpected, f"rows for keys nobody sent: {unexpected[:10]}"
    bad_tags = {k: v for k, v in ledger.items() if v[0] != "INSERT 0 1"}
    assert not bad_tags, f"ledger entries with a wrong command tag: {list(bad_tags.items())[:5]}"
    strangers = {k: v[1] for k, v in ledger.items() if not v[1].startswith("support-")}
    assert not strangers, f"ledger entries of agents that sent nothing: {strangers}"
    return len(ledger), sum(rows.values())
