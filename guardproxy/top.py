"""`guardproxy top`: agents ranked by DB time, live, from the admin console.

Every refresh reads SHOW AGENTS (cumulative counters) and computes rates from
the difference with the previous read. ``q`` quits (on a terminal). Agent ids
and type names are shown as data (`textsafe.visible`, never as markup).
"""

from __future__ import annotations

import contextlib
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from guardproxy.textsafe import visible


@dataclass(frozen=True)
class AgentRow:
    agent: str
    agent_type: str
    sessions: int
    statements: int
    db_time: float
    denials: int
    rows_affected: int


def read_agents(conn: psycopg.Connection[tuple[str, ...]]) -> dict[tuple[str, str], AgentRow]:
    rows = conn.execute("SHOW AGENTS").fetchall()
    out = {}
    for r in rows:
        row = AgentRow(r[0], r[1], int(r[2]), int(r[3]), float(r[4]), int(r[5]), int(r[6]))
        out[row.agent, row.agent_type] = row
    return out


def render(
    now: dict[tuple[str, str], AgentRow], before: dict[tuple[str, str], AgentRow], seconds: float
) -> Table:
    table = Table(title="guardproxy top: agents by DB time (q quits)")
    for name in (
        "agent",
        "type",
        "sessions",
        "stmts/s",
        "DB time/s",
        "DB time total",
        "denials",
        "rows affected",
    ):
        table.add_column(name, justify="left" if name in ("agent", "type") else "right")
    total = sum(r.db_time for r in now.values()) or 1.0
    for key, row in sorted(now.items(), key=lambda kv: -kv[1].db_time):
        prev = before.get(key)
        rate = (row.statements - prev.statements) / seconds if prev and seconds else 0.0
        busy = (row.db_time - prev.db_time) / seconds if prev and seconds else 0.0
        table.add_row(
            Text(visible(row.agent)),  # agent ids are login names an agent chose: data
            Text(visible(row.agent_type)),
            str(row.sessions),
            f"{rate:.1f}",
            f"{busy:.3f}",
            f"{row.db_time:.2f}s ({100 * row.db_time / total:.0f}%)",
            str(row.denials),
            str(row.rows_affected),
        )
    return table


@contextlib.contextmanager
def _keys() -> Iterator[bool]:
    if not sys.stdin.isatty():
        yield False
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(timeout: float) -> bool:
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    return bool(ready) and sys.stdin.read(1).lower() == "q"


def run(dsn: str, interval: float = 1.0, iterations: int | None = None) -> None:
    console = Console()
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
        before = read_agents(conn)
        last = time.monotonic()
        with (
            _keys() as interactive,
            Live(render(before, {}, 0.0), console=console, auto_refresh=False) as live,
        ):
            count = 0
            while iterations is None or count < iterations:
                if interactive:
                    if _quit_pressed(interval):
                        return
                else:
                    time.sleep(interval)
                now = read_agents(conn)
                t = time.monotonic()
                live.update(render(now, before, t - last), refresh=True)
                before, last = now, t
                count += 1
