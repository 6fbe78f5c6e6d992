"""``guardproxy replay``: what a policy would have done to past statements.

Statements are read from a source (`read_source`) and judged one after the other
by the same `Judge` the proxy uses, as one session of one agent of the type (``SET
guard.*`` and ``PREPARE`` carry over to later statements, as in a session). Nothing
is sent to any database. A policy in ``mode: monitor`` is replayed as if it were
enforced: the question replay answers is what enforcing would change.

Sources:

* a SQL script: statements separated by ``;`` (quotes, dollar quoting and comments
  as Postgres reads them; psql meta-commands are skipped);
* one JSON string per line (``"SELECT 1"``), e.g. written by an agent framework;
* a Postgres CSV log (``log_destination = 'csvlog'``): the ``statement:`` and
  ``execute <name>:`` messages of ``log_statement`` and ``log_min_duration_statement``
  (``parse`` and ``bind`` messages are skipped, a statement is counted once);
  chosen by a ``.csv`` file name or a ``csvlog:`` prefix;
* ``pg_stat_statements`` of the ``--upstream`` database: each normalized statement
  weighted by its ``calls``.

`Summary` counts allowed / rewritten / denied (weighted) and, per outcome and rule,
how many and a few example statements with the reason; its text shows them through
`textsafe.visible` (a log holds what agents wrote), its JSON as they were.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pglast import parser

from ..analysis.catalog import Catalog
from ..policy.agent import AgentPolicy
from ..policy.context import SessionContext
from ..policy.engine import Judge
from ..policy.loader import PolicySet
from ..textsafe import visible
from .schema import strip_meta_commands

# csvlog columns (PostgreSQL 13+): user_name is 2nd, message 14th
_CSV_USER, _CSV_MESSAGE = 1, 13
_LOGGED = re.compile(
    r"^(?:duration: [\d.]+ ms\s+)?(?:statement|execute [^:]*): (?P<sql>.*)\Z", re.DOTALL
)
_EXAMPLE_CHARS = 240


@dataclass(frozen=True)
class Statement:
    sql: str
    weight: int = 1  # executions it stands for (pg_stat_statements calls)
    user: str | None = None


def read_source(
    source: str, upstream: str | None = None, user: str | None = None
) -> list[Statement]:
    """The statements of `source` (see the module docstring); ValueError / OSError say
    what is wrong."""
    if source == "pg_stat_statements":
        if not upstream:
            raise ValueError(
                "--from pg_stat_statements reads the --upstream database: give --upstream DSN"
            )
        return pg_stat_statements(upstream, user)
    kind, _, name = source.partition(":")
    if kind in ("csvlog", "sql", "jsonl") and name:
        path = Path(name)
    else:
        kind, path = "", Path(source)
    text = path.read_text(encoding="utf-8", errors="replace")
    if not kind:
        kind = (
            "csvlog"
            if path.suffix == ".csv"
            else "jsonl"
            if text.lstrip().startswith('"')
            else "sql"
        )
    if kind == "csvlog":
        return from_csvlog(text.splitlines(keepends=True), user)
    if kind == "jsonl":
        return from_json_lines(text)
    return from_sql_script(text)


def from_sql_script(text: str) -> list[Statement]:
    try:
        parts = parser.split(strip_meta_commands(text), with_parser=False)
    except parser.ParseError as exc:
        raise ValueError(f"the statements cannot be split: {exc}") from None
    return [Statement(p.strip()) for p in parts if p.strip()]


def from_json_lines(text: str) -> list[Statement]:
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {number}: not a JSON string: {exc.msg}") from None
        if not isinstance(value, str):
            raise ValueError(f"line {number}: expected a JSON string holding one statement")
        out.append(Statement(value))
    return out


def from_csvlog(lines: Iterable[str], user: str | None = None) -> list[Statement]:
    out = []
    for row in csv.reader(lines):
        if len(row) <= _CSV_MESSAGE:
            continue
        if user is not None and row[_CSV_USER] != user:
            continue
        match = _LOGGED.match(row[_CSV_MESSAGE])
        if match is not None and match.group("sql").strip():
            out.append(Statement(match.group("sql").strip(), user=row[_CSV_USER] or None))
    return out


def pg_stat_statements(dsn: str, user: str | None = None) -> list[Statement]:
    import psycopg

    query = (
        "SELECT s.query, s.calls, r.rolname FROM pg_stat_statements s "
        "JOIN pg_catalog.pg_roles r ON r.oid = s.userid "
        "WHERE s.dbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())"
        " AND (%(user)s::text IS NULL OR r.rolname = %(user)s) ORDER BY s.calls DESC, s.query"
    )
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            rows = conn.execute(query, {"user": user}).fetchall()
    except psycopg.Error as exc:
        raise ValueError(
            f"cannot read pg_stat_statements: {str(exc).strip()} (the extension must be "
            "installed in the database and its view readable by the login)"
        ) from None
    return [Statement(str(q), int(c or 1), str(r)) for q, c, r in rows if q]


@dataclass
class _Group:
    outcome: str
    rule: str
    count: int = 0
    examples: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Summary:
    agent_type: str
    source: str
    statements: int = 0
    executions: int = 0
    outcomes: dict[str, int] = field(
        default_factory=lambda: {"allowed": 0, "rewritten": 0, "denied": 0}
    )
    groups: dict[tuple[str, str], _Group] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "agent_type": self.agent_type,
            "source": self.source,
            "statements": self.statements,
            "executions": self.executions,
            "outcomes": dict(self.outcomes),
            "rules": [
                {"outcome": g.outcome, "rule": g.rule, "count": g.count, "examples": g.examples}
                for g in self._ordered()
            ],
        }

    def _ordered(self) -> list[_Group]:
        order = {"denied": 0, "rewritten": 1, "allowed": 2}
        return sorted(self.groups.values(), key=lambda g: (order[g.outcome], -g.count, g.rule))

    def text(self) -> str:
        lines = [
            f"replayed {self.statements} statements ({self.executions} executions) as agent "
            f"type {self.agent_type} from {self.source}; nothing was sent to a database",
        ]
        lines += [f"  {k:<10} {v}" for k, v in self.outcomes.items()]
        current = ""
        for group in self._ordered():
            if group.outcome == "allowed":
                continue
            if group.outcome != current:
                current = group.outcome
                lines += ["", f"{current}, by rule:"]
            lines.append(f"  {group.rule or '(no rule)'}: {group.count}")
            for example in group.examples:  # logged statements are agents' text: data
                lines.append(f"    {visible(example['sql'])}")
                lines.append(f"      -> {visible(example['reason'])}")
        return "\n".join(lines)


def _one_line(sql: str) -> str:
    lines = sql.strip().split("\n")
    while len(lines) > 1 and lines[0].lstrip().startswith("--"):
        lines.pop(0)  # the comments before a statement of a script are not the statement
    flat = " ".join(" ".join(lines).split())
    return flat if len(flat) <= _EXAMPLE_CHARS else flat[: _EXAMPLE_CHARS - 3] + "..."


def replay(
    policy_set: PolicySet,
    policy: AgentPolicy,
    statements: list[Statement],
    catalog: Catalog | None = None,
    agent_id: str | None = None,
    principals: str | None = None,
    examples: int = 2,
    source: str = "",
) -> Summary:
    """Judge `statements` as one session of an agent of `policy`'s type."""
    enforced = replace(policy, mode="enforce") if policy.monitor else policy
    judge = Judge(policy_set, catalog)
    agent = agent_id or policy.agents[0].replace("*", "1").replace("?", "x")
    ctx = SessionContext(agent_id=agent).with_updates({"principals": principals or ""})
    summary = Summary(policy.name, source or "the statements given")
    for statement in statements:
        decision = judge.judge(enforced, statement.sql, ctx)
        outcome = {"deny": "denied", "rewrite": "rewritten"}.get(decision.action, "allowed")
        summary.statements += 1
        summary.executions += statement.weight
        summary.outcomes[outcome] += statement.weight
        group = summary.groups.setdefault((outcome, decision.rule), _Group(outcome, decision.rule))
        group.count += statement.weight
        shown = {e["sql"] for e in group.examples}
        text = _one_line(statement.sql)
        if len(group.examples) < examples and text not in shown:
            group.examples.append(
                {"sql": text, "reason": decision.reason or "allowed", "hint": decision.hint}
            )
        if decision.allowed:
            ctx = ctx.with_updates(decision.context_updates)
            for name, prepared in decision.prepared.items():
                ctx = ctx.with_prepared(name, prepared)
    return summary
