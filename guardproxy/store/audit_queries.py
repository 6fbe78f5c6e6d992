"""What the audit CLI reads and undoes, in guardproxy's own schema (psycopg, synchronous).

* `deletes(...)`, `events(...)`: rows of ``deleted_rows`` / ``audit_events`` (with the
  ``outcome`` of each write when the schema has it, revision 0005);
* `undo_plan(dsn, task=, agent=, since=, row=)`: the recorded deletes not restored yet,
  of a task, of an agent over a period, or of one row (`parse_row`: ``TABLE:KEY``);
* `undo(dsn, plan, command, task=)`: restores them in one transaction and records the
  undo as an audit event naming the command.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

_SINCE = re.compile(r"^\s*(\d+)\s*(s|m|min|h|d)\s*$")
SOFT_COLUMNS = ("deleted_at", "deleted_by", "delete_reason")


def parse_since(text: str) -> timedelta:
    """``90s``, ``15m``, ``2h``, ``7d``: raises ValueError saying what is expected."""
    match = _SINCE.match(text)
    if match is None:
        raise ValueError(f"--since {text!r}: expected a number and a unit, e.g. 30m, 2h, 7d")
    amount, unit = int(match.group(1)), match.group(2)
    return {
        "s": timedelta(seconds=amount),
        "m": timedelta(minutes=amount),
        "min": timedelta(minutes=amount),
        "h": timedelta(hours=amount),
        "d": timedelta(days=amount),
    }[unit]


def deletes(
    dsn: str, agent: str | None, task: str | None, since: timedelta
) -> list[dict[str, Any]]:
    """Rows agents deleted: soft deletes (the row is still in its table) and captured hard deletes."""
    query = """
        SELECT id, at, agent_id AS agent, task, step, reason, table_name AS "table", primary_key,
               CASE WHEN row_image ? 'deleted_at' AND row_image->>'deleted_at' IS NOT NULL
                    THEN 'soft' ELSE 'hard' END AS how,
               restored_at
        FROM guardproxy.deleted_rows
        WHERE at > now() - %(since)s
          AND (%(agent)s::text IS NULL OR agent_id = %(agent)s)
          AND (%(task)s::text IS NULL OR task = %(task)s)
        ORDER BY at, id"""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(query, {"since": since, "agent": agent, "task": task}).fetchall()


_HAS_OUTCOME = """SELECT EXISTS (SELECT FROM information_schema.columns
    WHERE table_schema = 'guardproxy' AND table_name = 'audit_events' AND column_name = 'outcome')"""


def events(
    dsn: str, kind: str, agent: str | None, task: str | None, since: timedelta
) -> list[dict[str, Any]]:
    """Audit events: kind 'writes' (allowed, rewritten, replayed writes), 'denials', or 'all'."""
    decisions = {"writes": ["allowed", "rewritten", "replayed", "undo"], "denials": ["denied"]}.get(
        kind
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(_HAS_OUTCOME).fetchone()
    outcome = "outcome" if row and row[0] else "NULL::text AS outcome"
    query = f"""
        SELECT id, at, agent_id AS agent, agent_type, task, step, decision, {outcome}, rule, rows,
               statement, reason
        FROM guardproxy.audit_events
        WHERE at > now() - %(since)s
          AND (%(agent)s::text IS NULL OR agent_id = %(agent)s)
          AND (%(task)s::text IS NULL OR task = %(task)s)
          AND (%(decisions)s::text[] IS NULL OR decision = ANY(%(decisions)s))
        ORDER BY at, id"""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        params = {"since": since, "agent": agent, "task": task, "decisions": decisions}
        return conn.execute(query, params).fetchall()


@dataclass(frozen=True)
class Restore:
    id: int
    table: str
    how: str
    primary_key: dict[str, Any]


@dataclass(frozen=True)
class RowRef:
    """``TABLE:KEY`` of ``undo --row``: a table (schema optional) and its key, either
    ``col=value[,col=value]`` or a single value for a one-column primary key."""

    schema: str | None
    table: str
    key: dict[str, str] | None  # None: `value` is the one key column's value
    value: str | None = None


def parse_row(text: str) -> RowRef:
    """``tickets:42``, ``public.tickets:42``, ``order_items:order_id=7,line=2``; ValueError
    says what is expected."""
    name, sep, key = text.partition(":")
    if not sep or not name.strip() or not key.strip():
        raise ValueError(
            f"--row {text!r}: expected TABLE:KEY, e.g. tickets:42 or order_items:order_id=7,line=2"
        )
    schema, _, table = name.strip().rpartition(".")
    if "=" not in key:
        return RowRef(schema or None, table, None, key.strip())
    pairs: dict[str, str] = {}
    for part in key.split(","):
        column, eq, value = part.partition("=")
        if not eq or not column.strip():
            raise ValueError(f"--row {text!r}: expected column=value pairs after the colon")
        pairs[column.strip()] = value.strip()
    return RowRef(schema or None, table, pairs)


def undo_plan(
    dsn: str,
    task: str | None = None,
    *,
    agent: str | None = None,
    since: timedelta | None = None,
    row: RowRef | None = None,
) -> list[Restore]:
    """The recorded deletes not restored yet: of a task, of an agent (over `since`), or the
    latest of one row; oldest first."""
    rows = deletes(dsn, agent, task, since or timedelta(days=36500))
    open_rows = [r for r in rows if r["restored_at"] is None]
    if row is not None:
        open_rows = [r for r in open_rows if _is_row(r, row)][-1:]
    return [Restore(r["id"], r["table"], r["how"], r["primary_key"]) for r in open_rows]


def _is_row(record: dict[str, Any], row: RowRef) -> bool:
    schema, _, table = str(record["table"]).rpartition(".")
    if table.strip('"') != row.table or (
        row.schema is not None and schema.strip('"') != row.schema
    ):
        return False
    key = record["primary_key"] or {}
    if row.key is None:
        return len(key) == 1 and str(next(iter(key.values()))) == row.value
    return {k: str(v) for k, v in key.items()} == row.key


def undo(
    dsn: str,
    task: str | None,
    plan: list[Restore],
    soft_columns: tuple[str, str, str] = SOFT_COLUMNS,
    command: str | None = None,
) -> int:
    """Restores the rows of ``plan`` in one transaction and records the undo (the audit
    event names `command`, by default ``guardproxy undo --task TASK``); returns rows restored."""
    restored = 0
    with psycopg.connect(dsn) as conn, conn.transaction():
        for item in plan:
            schema, _, table = item.table.rpartition(".")
            target = sql.Identifier(schema.strip('"') or "public", table.strip('"'))
            where = sql.SQL(" AND ").join(
                sql.SQL("{} = {}").format(sql.Identifier(k), sql.Literal(v))
                for k, v in item.primary_key.items()
            )
            if item.how == "soft":
                cur = conn.execute(
                    sql.SQL("UPDATE {} SET {} = NULL, {} = NULL, {} = NULL WHERE {}").format(
                        target, *(sql.Identifier(c) for c in soft_columns), where
                    )
                )
            else:
                # OVERRIDING SYSTEM VALUE: the row comes back with its own id, identity or not
                cur = conn.execute(
                    sql.SQL(
                        "INSERT INTO {t} OVERRIDING SYSTEM VALUE "
                        "SELECT (jsonb_populate_record(NULL::{t}, row_image)).* "
                        "FROM guardproxy.deleted_rows WHERE id = {id}"
                    ).format(t=target, id=sql.Literal(item.id))
                )
            restored += cur.rowcount
            conn.execute(
                "UPDATE guardproxy.deleted_rows SET restored_at = now() WHERE id = %s", (item.id,)
            )
        conn.execute(
            "INSERT INTO guardproxy.audit_events (agent_id, agent_type, task, statement, decision, rows, reason) "
            "VALUES (current_user, 'operator', %s, %s, 'undo', %s, %s)",
            (
                task,
                json.dumps([r.id for r in plan]),
                restored,
                command or f"guardproxy undo --task {task}",
            ),
        )
    return restored
