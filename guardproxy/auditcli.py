"""``guardproxy audit ...`` and ``guardproxy undo``: what agents did, and taking it back.

Both read guardproxy's schema in the database of ``--upstream`` (or
``GUARDPROXY_UPSTREAM``); they never start the embedded cluster (its DSN is used
only while ``guardproxy serve`` runs it). Every value an agent could have written
(statements, reasons, keys, ids) is shown through `textsafe.visible` and never
read as markup. `render(...)` lays records out for the terminal's width: a table
when it is wide enough, one record per block otherwise (``--layout``).
"""

from __future__ import annotations

import io
import json
import shutil
import textwrap
from datetime import datetime
from typing import Annotated, Any

import typer

from .cliutil import Opt, UpstreamOpt, fail, required_upstream
from .textsafe import visible

audit_app = typer.Typer(
    no_args_is_help=True, help="What agents did: deletes, writes, denials, one task."
)
SinceOpt = Annotated[str, Opt("--since", help="how far back: 30m, 2h, 7d")]
JsonOpt = Annotated[bool, Opt("--json", help="JSON for scripts")]
LayoutOpt = Annotated[
    str,
    Opt("--layout", help="table, records (one block per record) or auto (by terminal width)"),
]
TABLE_WIDTH = 120  # narrower terminals get one record per block
_LABELS = {"primary_key": "key", "restored_at": "restored", "agent_type": "type"}


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
    app.command("undo")(undo)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, dict | list):
        return visible(json.dumps(value, default=str))
    return visible(value)


def render(
    rows: list[dict[str, Any]], columns: list[str], title: str, width: int, layout: str = "auto"
) -> str:
    """The records as text for a terminal `width` columns wide (see the module docstring)."""
    heading = f"{title} ({len(rows)})"
    if layout == "table" or (layout == "auto" and width >= TABLE_WIDTH):
        return _table(rows, columns, heading, width)
    return _records(rows, columns, heading, width)


def _table(rows: list[dict[str, Any]], columns: list[str], heading: str, width: int) -> str:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(heading))
    for column in columns:
        table.add_column(Text(_LABELS.get(column, column)), overflow="fold")
    for row in rows:
        table.add_row(*(Text(_cell(row.get(c))) for c in columns))
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, force_terminal=False).print(table)
    return out.getvalue().rstrip("\n")


def _records(rows: list[dict[str, Any]], columns: list[str], heading: str, width: int) -> str:
    label_width = max((len(_LABELS.get(c, c)) for c in columns), default=4) + 2
    room = max(width - label_width - 4, 20)
    lines = [heading]
    for number, row in enumerate(rows, 1):
        lines.append(f"[{number}]")
        for column in columns:
            value = _cell(row.get(column))
            if not value:
                continue
            label = _LABELS.get(column, column).ljust(label_width)
            pieces = textwrap.wrap(value, room, break_long_words=True, replace_whitespace=False)
            pieces = pieces or [value]
            lines.append(f"  {label}{pieces[0]}")
            lines += [f"  {' ' * label_width}{piece}" for piece in pieces[1:]]
    return "\n".join(lines)


def _terminal_width() -> int:
    return shutil.get_terminal_size((100, 24)).columns


def _show(
    rows: list[dict[str, Any]], columns: list[str], title: str, as_json: bool, layout: str
) -> None:
    if as_json:
        typer.echo(json.dumps(rows, default=str))  # JSON escapes every control character
        return
    if layout not in ("auto", "table", "records"):
        fail(f"--layout {layout!r}: expected auto, table or records")
    typer.echo(render(rows, columns, title, _terminal_width(), layout))


def _since(text: str) -> Any:
    from guardproxy.store.audit_queries import parse_since

    try:
        return parse_since(text)
    except ValueError as exc:
        fail(str(exc))


def _query(what: str, call: Any) -> Any:
    import psycopg

    try:
        return call()
    except psycopg.Error as exc:
        fail(
            f"cannot read {what}: {str(exc).strip()} (is guardproxy's schema there? `guardproxy db current`)"
        )


DELETE_COLUMNS = [
    "at",
    "agent",
    "table",
    "primary_key",
    "how",
    "task",
    "step",
    "reason",
    "restored_at",
]
EVENT_COLUMNS = [
    "at",
    "agent",
    "agent_type",
    "task",
    "step",
    "decision",
    "outcome",
    "rule",
    "rows",
    "statement",
    "reason",
]


@audit_app.command("deletes")
def audit_deletes(
    agent: Annotated[str | None, Opt("--agent", help="agent id")] = None,
    task: Annotated[str | None, Opt("--task", help="task id")] = None,
    since: SinceOpt = "24h",
    as_json: JsonOpt = False,
    layout: LayoutOpt = "auto",
    upstream: UpstreamOpt = None,
) -> None:
    """What an agent deleted, row by row: soft-deleted rows and captured hard deletes."""
    from guardproxy.store.audit_queries import deletes

    dsn = required_upstream(upstream, "guardproxy audit")
    rows = _query("the deleted rows", lambda: deletes(dsn, agent, task, _since(since)))
    _show(rows, DELETE_COLUMNS, "rows deleted by agents", as_json, layout)


def _events(
    kind: str,
    agent: str | None,
    task: str | None,
    since: str,
    as_json: bool,
    layout: str,
    upstream: str | None,
) -> None:
    from guardproxy.store.audit_queries import events

    dsn = required_upstream(upstream, "guardproxy audit")
    rows = _query("the audit log", lambda: events(dsn, kind, agent, task, _since(since)))
    columns = [c for c in EVENT_COLUMNS if kind != "denials" or c != "outcome"]
    _show(rows, columns, f"audit events: {kind}", as_json, layout)


@audit_app.command("writes")
def audit_writes(
    agent: Annotated[str | None, Opt("--agent", help="agent id")] = None,
    task: Annotated[str | None, Opt("--task", help="task id")] = None,
    since: SinceOpt = "24h",
    as_json: JsonOpt = False,
    layout: LayoutOpt = "auto",
    upstream: UpstreamOpt = None,
) -> None:
    """Writes agents made (allowed, rewritten, replayed), what became of them, and undos."""
    _events("writes", agent, task, since, as_json, layout, upstream)


@audit_app.command("denials")
def audit_denials(
    agent: Annotated[str | None, Opt("--agent", help="agent id")] = None,
    task: Annotated[str | None, Opt("--task", help="task id")] = None,
    since: SinceOpt = "24h",
    as_json: JsonOpt = False,
    layout: LayoutOpt = "auto",
    upstream: UpstreamOpt = None,
) -> None:
    """Statements the policies refused, with the rule and the reason."""
    _events("denials", agent, task, since, as_json, layout, upstream)


@audit_app.command("task")
def audit_task(
    task: Annotated[str, typer.Argument(help="task id")],
    since: SinceOpt = "30d",
    as_json: JsonOpt = False,
    layout: LayoutOpt = "auto",
    upstream: UpstreamOpt = None,
) -> None:
    """Everything one task did: writes, rewrites, denials, replays."""
    _events("all", None, task, since, as_json, layout, upstream)


def undo(
    task: Annotated[str | None, Opt("--task", help="restore what this task deleted")] = None,
    agent: Annotated[
        str | None, Opt("--agent", help="restore what this agent deleted (with --since)")
    ] = None,
    since: Annotated[
        str | None, Opt("--since", help="with --agent: how far back, e.g. 2h [24h]")
    ] = None,
    row: Annotated[
        str | None,
        Opt("--row", help="restore one row: TABLE:KEY, e.g. tickets:42 or t:a=1,b=2"),
    ] = None,
    dry_run: Annotated[
        bool, Opt("--dry-run", help="show what would be restored, change nothing")
    ] = False,
    yes: Annotated[bool, Opt("--yes", "-y", help="do not ask before restoring")] = False,
    upstream: UpstreamOpt = None,
) -> None:
    """Restore what agents deleted: un-soft-delete rows, re-insert captured hard deletes.

    Choose what with exactly one of --task T, --agent A [--since 2h], --row TABLE:KEY.
    """
    from guardproxy.store.audit_queries import parse_row, undo_plan
    from guardproxy.store.audit_queries import undo as run_undo

    chosen = [
        name for name, value in (("--task", task), ("--agent", agent), ("--row", row)) if value
    ]
    if len(chosen) != 1:
        fail(
            "undo restores one thing: give exactly one of --task T, --agent A [--since 2h], --row TABLE:KEY"
        )
    if since is not None and agent is None:
        fail("--since goes with --agent")
    dsn = required_upstream(upstream, "guardproxy undo")
    if task is not None:
        what, command = f"task {visible(task)}", f"guardproxy undo --task {task}"
        plan = _query("the deleted rows", lambda: undo_plan(dsn, task))
    elif agent is not None:
        period = since or "24h"
        what = f"agent {visible(agent)} in the last {period}"
        command = f"guardproxy undo --agent {agent} --since {period}"
        window = _since(period)
        plan = _query("the deleted rows", lambda: undo_plan(dsn, agent=agent, since=window))
    else:
        assert row is not None
        try:
            ref = parse_row(row)
        except ValueError as exc:
            fail(str(exc))
        what, command = f"row {visible(row)}", f"guardproxy undo --row {row}"
        plan = _query("the deleted rows", lambda: undo_plan(dsn, row=ref))
    if not plan:
        typer.echo(f"{what} has no deleted rows left to restore")
        return
    for item in plan:
        typer.echo(f"  {item.how:4} {visible(item.table)} {_cell(item.primary_key)}")
    if dry_run:
        typer.echo(f"dry run: {len(plan)} rows of {what} would be restored")
        return
    if not yes and not typer.confirm(f"restore these {len(plan)} rows of {what}?"):
        raise typer.Exit(1)
    restored = _query("and restore the rows", lambda: run_undo(dsn, task, plan, command=command))
    typer.echo(f"restored {restored} rows of {what}; the undo is in the audit log")
