"""What the audit CLI reads and undoes, in guardproxy's own schema (psycopg, synchronous)."""

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


def events(
    dsn: str, kind: str, agent: str | None, task: str | None, since: timedelta
) -> list[dict[str, Any]]:
    """Audit events: kind 'writes' (allowed, rewritten, replayed writes), 'denials', or 'all'."""
    decisions = {"writes": ["allowed", "rewritten", "replayed", "undo"], "denials": ["denied"]}.get(
        kind
    )
    query = """
        SELECT id, at, agent_id AS agent, agent_type, task, step, decision, rule, rows, statement, reason
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


def undo_plan(dsn: str, task: str) -> list[Restore]:
    rows = deletes(dsn, None, task, timedelta(days=36500))
    return [
        Restore(r["id"], r["table"], r["how"], r["primary_key"])
        for r in rows
        if r["restored_at"] is None
    ]


def undo(
    dsn: str, task: str, plan: list[Restore], soft_columns: tuple[str, str, str] = SOFT_COLUMNS
) -> int:
    """Restores the rows of ``plan`` in one transaction and records the undo; returns rows restored."""
    restored = 0
    with psycopg.connect(dsn) as conn, conn.transaction():
        for item in plan:
            schema, _, table = item.table.rpartition(".")
            target = sql.Identifier(schema or "public", table)
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
                cur = conn.execute(
                    sql.SQL(
                        "INSERT INTO {t} SELECT (jsonb_populate_record(NULL::{t}, row_image)).* "
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
            (task, json.dumps([r.id for r in plan]), restored, f"guardproxy undo --task {task}"),
        )
    return restored
