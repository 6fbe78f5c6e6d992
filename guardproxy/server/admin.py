"""The admin console: the virtual database ``guardproxy``, like PgBouncer's ``pgbouncer``.

Admin users (``admin_users``) connect to database ``guardproxy`` and send simple
queries; every answer is an ordinary result set, so psql and any driver can
read it. Commands: SHOW POOLS | CLIENTS | SERVERS | AGENTS | STATS | CONFIG,
RELOAD, PAUSE, RESUME, KILL AGENT <id>.

Everything shown is data, whoever chose it: agent ids (any user name, in trust
mode), tasks and the like pass through `guardproxy.safetext.visible`, so a control
character or escape sequence reaches no operator's terminal raw and a newline forges
no row. Settings are shown with every credential masked (`guardproxy.dsnmask`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from guardproxy.dsnmask import mask_dsn
from guardproxy.protocol import codec
from guardproxy.protocol.errors import GuardError
from guardproxy.safetext import visible

if TYPE_CHECKING:
    from guardproxy.server.services import ProxyServices

_COMMAND = re.compile(r"^\s*(show\s+\w+|reload|pause|resume|kill\s+agent\s+(\S+))\s*;?\s*$", re.I)


def result(names: list[str], rows: Sequence[Sequence[str | None]], tag: str) -> bytes:
    """A result set; every value made visible (no raw control or format characters)."""
    return b"".join(
        [
            codec.build_row_description(names),
            *(codec.build_data_row([None if v is None else visible(v) for v in r]) for r in rows),
            codec.build_command_complete(tag),
        ]
    )


async def run(proxy: ProxyServices, sql: str) -> bytes:
    """Answers one admin command; raises GuardError (42601) for anything else."""
    match = _COMMAND.match(sql)
    if match is None:
        raise GuardError(
            f"unknown admin command: {sql.strip()[:80]!r}",
            hint="SHOW POOLS|CLIENTS|SERVERS|AGENTS|STATS|CONFIG, RELOAD, PAUSE, RESUME, KILL AGENT <id>",
            sqlstate="42601",
        )
    words = match.group(1).lower().split()
    if words[0] == "show":
        handler = _SHOW.get(words[1])
        if handler is None:
            raise GuardError(
                f"SHOW {words[1].upper()} is not an admin view",
                hint="try SHOW POOLS",
                sqlstate="42601",
            )
        return handler(proxy)
    if words[0] == "reload":
        message = proxy.reload()
        return result(["reload"], [[message]], "RELOAD")
    if words[0] == "pause":
        await proxy.pause()
        return codec.build_command_complete("PAUSE")
    if words[0] == "resume":
        proxy.resume()
        return codec.build_command_complete("RESUME")
    agent = match.group(2).strip("'\"")
    killed = proxy.kill_agent(agent)
    return result(["agent", "sessions_killed"], [[agent, str(killed)]], "KILL")


def _pools(proxy: ProxyServices) -> bytes:
    names = [
        "pool",
        "upstream",
        "servers_active",
        "servers_idle",
        "clients_waiting",
        "pool_size",
        "pinned",
        "paused",
    ]
    rows = []
    for name, pool in proxy.pools.items():
        up = pool.upstream
        rows.append(
            [
                name,
                f"{up.user}@{up.host}:{up.port}/{up.database}",
                str(pool.active),
                str(len(pool.idle)),
                str(len(pool.waiters)),
                str(pool.settings.pool_size),
                str(pool.pinned),
                str(pool.paused).lower(),
            ]
        )
    return result(names, rows, f"SHOW {len(rows)}")


def _clients(proxy: ProxyServices) -> bytes:
    names = ["agent", "agent_type", "peer", "state", "pinned", "task", "transactions", "queries"]
    rows = []
    for s in proxy.sessions.values():
        state = "active" if s.server is not None else ("waiting" if s.blocked else "idle")
        rows.append(
            [
                s.agent_id,
                s.agent_type,
                s.peer,
                state,
                str(s.pinned).lower(),
                s.task or "",
                str(s.transactions),
                str(s.queries),
            ]
        )
    return result(names, rows, f"SHOW {len(rows)}")


def _servers(proxy: ProxyServices) -> bytes:
    names = [
        "pool",
        "serial",
        "backend_pid",
        "state",
        "agent",
        "age_seconds",
        "prepared_statements",
    ]
    rows = []
    now = time.monotonic()
    for name, pool in proxy.pools.items():
        for srv in pool.servers:
            client = srv.client
            agent = getattr(client, "agent_id", "") if client is not None else ""
            rows.append(
                [
                    name,
                    str(srv.serial),
                    str(srv.backend_pid),
                    "active" if client is not None else "idle",
                    agent,
                    f"{now - srv.created_at:.0f}",
                    str(len(srv.prepared)),
                ]
            )
    return result(names, rows, f"SHOW {len(rows)}")


def _agents(proxy: ProxyServices) -> bytes:
    names = [
        "agent",
        "agent_type",
        "sessions",
        "statements",
        "db_time_seconds",
        "denials",
        "rows_affected",
    ]
    rows = []
    for a in sorted(proxy.stats.agents.values(), key=lambda a: -a.statement_time.total):
        rows.append(
            [
                a.agent,
                a.agent_type,
                str(a.sessions),
                str(sum(a.statements.values())),
                f"{a.statement_time.total:.3f}",
                str(sum(a.denials.values())),
                str(a.rows_affected),
            ]
        )
    return result(names, rows, f"SHOW {len(rows)}")


def _stats(proxy: ProxyServices) -> bytes:
    agents = proxy.stats.agents.values()
    rows = [
        ["client_sessions", str(sum(a.sessions for a in agents))],
        ["statements", str(sum(sum(a.statements.values()) for a in agents))],
        ["denials", str(sum(sum(a.denials.values()) for a in agents))],
        ["db_time_seconds", f"{sum(a.statement_time.total for a in agents):.3f}"],
        ["transactions", str(sum(a.transaction_time.n for a in agents))],
        ["servers_lent", str(sum(p.acquired_total for p in proxy.pools.values()))],
        ["pool_wait_seconds", f"{sum(p.wait_seconds_total for p in proxy.pools.values()):.3f}"],
        ["acquire_timeouts", str(sum(p.timeouts_total for p in proxy.pools.values()))],
        ["decision_cache_hits", str(proxy.stats.cache_hits)],
        ["decision_cache_misses", str(proxy.stats.cache_misses)],
        ["auth_failures", str(proxy.stats.auth_failures)],
    ]
    return result(["stat", "value"], [[k, v] for k, v in rows], f"SHOW {len(rows)}")


def _config(proxy: ProxyServices) -> bytes:
    rows = []
    for key, value in proxy.settings.model_dump().items():
        # every value, not only upstream: a credential must not show wherever it was put
        rows.append([key, "" if value is None else mask_dsn(str(value))])
    return result(["setting", "value"], rows, f"SHOW {len(rows)}")


_SHOW = {
    "pools": _pools,
    "clients": _clients,
    "servers": _servers,
    "agents": _agents,
    "stats": _stats,
    "config": _config,
}
