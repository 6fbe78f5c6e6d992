"""``guardproxy check --upstream``: a policy set checked against the real database.

`catalog_findings(policy_set, schema)` (pure) checks every name a policy writes
against a `DbSchema`: tables (and what each glob covers), the columns of
``columns`` / ``update_columns`` / ``insert_columns`` / ``deny_columns`` and of
``soft_delete``, required columns an ``insert_columns`` list leaves out, the
primary key undo needs, the functions of ``functions.allow`` / ``deny``. Globs are
listed with the tables they cover, with a warning for each covered table whose
columns look like personal data and are not denied.

`plan_findings(policy_set, dsn)` asks Postgres to plan every row-filter condition
(``EXPLAIN SELECT FROM table WHERE condition``, placeholders filled with an empty
principals array and NULLs) in a read-only transaction, as the type's upstream role
when it exists and the login may become it: a misspelt column, a type mismatch,
a missing function or privilege is reported with Postgres' own words. It also says
when an upstream role does not exist yet.

Each `Finding` names the file and line (`yamllines`) and the key path.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from pglast.stream import RawStream

from ..analysis.pg_builtins import BUILTIN_FUNCTIONS
from ..policy.agent import AgentPolicy, TableRule, key_path
from ..policy.loader import PolicySet
from ..policy.models import TableDocument
from ..policy.names import quote_ident
from ..policy.rowfilter import RowFilter, principals_literal
from .personal import personal_columns
from .schema import DbSchema, Table
from .yamllines import key_lines, line_of

Level = str  # "error", "warning" or "info"


@dataclass(frozen=True)
class Finding:
    file: Path
    line: int | None
    where: str  # the key path, e.g. tables.tickets.update_columns[1]
    message: str
    level: Level = "error"

    def __str__(self) -> str:
        place = f"{self.file}:{self.line}" if self.line else str(self.file)
        prefix = "" if self.level == "error" else f"{self.level}: "
        return f"{prefix}{place}: {self.where}: {self.message}"


class _Report:
    """Findings of one policy file, with its key lines."""

    def __init__(self, policy: AgentPolicy) -> None:
        self.policy = policy
        try:
            text = policy.source.read_text(encoding="utf-8")
        except OSError:
            text = ""
        self.lines = key_lines(text)
        self.findings: list[Finding] = []

    def add(self, path: tuple[str | int, ...], message: str, level: Level = "error") -> None:
        line = line_of(self.lines, path)
        self.findings.append(Finding(self.policy.source, line, key_path(*path), message, level))


def _did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _qualified(table: Table) -> str:
    return f"{quote_ident(table.schema)}.{quote_ident(table.name)}"


def covered_tables(policy: AgentPolicy, rule: TableRule, schema: DbSchema) -> list[Table]:
    """The tables of the database a rule names (one, none, or what a glob covers)."""
    catalog = schema.catalog()
    if rule.pattern:
        found = [schema.table(*r) for r in policy.glob_matches(rule, catalog)]
        return [t for t in found if t is not None]
    table = schema.resolve(rule.schema, rule.name)
    return [table] if table is not None else []


def catalog_findings(policy_set: PolicySet, schema: DbSchema) -> list[Finding]:
    """Names of every policy checked against `schema` (see the module docstring)."""
    out: list[Finding] = []
    for policy in policy_set:
        report = _Report(policy)
        for rule in policy.tables:
            doc = policy.document.tables.get(rule.key)
            if doc is not None:
                _table(report, rule, doc, schema)
        _functions(report, schema)
        out.extend(report.findings)
    return out


def _table(report: _Report, rule: TableRule, doc: TableDocument, schema: DbSchema) -> None:
    path: tuple[str | int, ...] = ("tables", rule.key)
    tables = covered_tables(report.policy, rule, schema)
    if rule.pattern:
        _glob(report, rule, tables, path)
        for table in tables:
            _columns(report, rule, doc, table, path, quiet=True)
        return
    if not tables:
        names = [t.name for t in schema.tables]
        where = f" (search path: {', '.join(schema.search_path)})" if rule.schema is None else ""
        report.add(
            path,
            f"no table or view {rule.key} in the database{where}{_did_you_mean(rule.name, names)}",
        )
        return
    _columns(report, rule, doc, tables[0], path, quiet=False)


def _glob(
    report: _Report, rule: TableRule, tables: list[Table], path: tuple[str | int, ...]
) -> None:
    if not tables:
        report.add(path, "the glob covers no table of the database", "warning")
        return
    names = ", ".join(f"{t.schema}.{t.name}" for t in tables)
    report.add(
        path, f"covers {len(tables)} table{'s' if len(tables) != 1 else ''}: {names}", "info"
    )
    for table in tables:
        exposed = {
            c: kind
            for c, kind in personal_columns(table.column_names).items()
            if c not in rule.deny_columns and (rule.columns is None or c in rule.columns)
        }
        if exposed:
            listed = ", ".join(f"{c} ({kind})" for c, kind in exposed.items())
            report.add(
                path,
                f"covers {table.schema}.{table.name}, whose columns {listed} look like personal "
                "data and are readable: add them to deny_columns, or give the table an exact "
                "entry (it overrides the glob)",
                "warning",
            )


def _columns(
    report: _Report,
    rule: TableRule,
    doc: TableDocument,
    table: Table,
    path: tuple[str | int, ...],
    quiet: bool,
) -> None:
    names = table.column_names
    for field in ("columns", "update_columns", "insert_columns", "deny_columns"):
        for index, column in enumerate(getattr(doc, field) or ()):
            if table.column(column) is None and not (quiet and field == "deny_columns"):
                report.add(
                    (*path, field, index),
                    f"no column {column} in {_qualified(table)}{_did_you_mean(column, names)} "
                    f"(its columns: {', '.join(names)})",
                )
    if rule.soft_delete is not None:
        missing = [c for c in rule.soft_delete.columns if table.column(c) is None]
        if missing:
            report.add(
                (*path, "soft_delete"),
                f"{_qualified(table)} has no column {', '.join(missing)}: `guardproxy soft-delete "
                f"sql {rule.key} --upstream DSN` prints the ALTER TABLE that adds the soft-delete "
                "columns",
            )
    if (rule.soft_delete is not None or rule.capture_deleted_rows) and not table.primary_key:
        report.add(
            path,
            f"{_qualified(table)} has no primary key: its deleted rows are recorded by their whole "
            "image, and `guardproxy undo --row` cannot name them",
            "warning",
        )
    if doc.insert_columns is not None:
        required = [
            c.name
            for c in table.columns
            if c.not_null and c.default is None and not c.identity and c.sequence is None
        ]
        left_out = [c for c in required if c not in (doc.insert_columns or ())]
        if left_out:
            report.add(
                (*path, "insert_columns"),
                f"leaves out {', '.join(left_out)}, which {_qualified(table)} requires (NOT NULL, "
                "no default): every INSERT of this agent type will fail",
                "warning",
            )


def _functions(report: _Report, schema: DbSchema) -> None:
    known = {name for _, name in schema.functions} | set(BUILTIN_FUNCTIONS)
    doc = report.policy.document.functions
    for field, names in (("allow", doc.allow), ("deny", doc.deny)):
        for index, name in enumerate(names):
            if any(ch in name for ch in "*?[") or name in known:
                continue
            report.add(
                ("functions", field, index),
                f"no function named {name} in the database and none built in"
                + _did_you_mean(name, sorted(known)),
                "warning",
            )


# ---------------------------------------------------------------- asking Postgres


def _filters(policy: AgentPolicy) -> Iterator[tuple[TableRule, str, RowFilter]]:
    for rule, row_filter in policy.row_filters:
        for op, variant in row_filter.variants:
            yield rule, op, variant


def explain_sql(table: Table, condition: RowFilter) -> str:
    """``EXPLAIN SELECT FROM table WHERE condition`` with the placeholders filled."""
    values: dict[str, str | None] = {name: None for name in condition.placeholders}
    values["principals"] = principals_literal(())
    expression = RawStream()(condition.expression(values))
    return f"EXPLAIN SELECT FROM {_qualified(table)} WHERE {expression}"


def plan_findings(policy_set: PolicySet, schema: DbSchema, dsn: str) -> list[Finding]:
    """Every row-filter condition planned by Postgres (see the module docstring)."""
    out: list[Finding] = []
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        for policy in policy_set:
            report = _Report(policy)
            role = _role_state(conn, policy.upstream_role)
            if role == "missing":
                report.add(
                    ("upstream_role",),
                    f"role {policy.upstream_role} does not exist yet: `guardproxy roles` prints "
                    "the script that creates it",
                    "info",
                )
            seen: set[tuple[str, Table, tuple[str, Level]]] = set()
            for rule, op, condition in _filters(policy):
                written = policy.document.row_filters.get(rule.key)
                path: tuple[str | int, ...] = ("row_filters", rule.key)
                if not isinstance(written, str):
                    path = (*path, op)
                for table in covered_tables(policy, rule, schema):
                    problem = _plan(conn, explain_sql(table, condition), policy, role)
                    if problem is not None and (rule.key, table, problem) not in seen:
                        seen.add((rule.key, table, problem))  # update/delete repeat select's
                        report.add(path, *problem)
            out.extend(report.findings)
    return out


def _role_state(conn: psycopg.Connection[tuple[object, ...]], role: str) -> str:
    """``member`` (the login may SET ROLE to it), ``other`` or ``missing``."""
    row = conn.execute(
        "SELECT pg_catalog.pg_has_role(current_user, oid, 'MEMBER') FROM pg_catalog.pg_roles "
        "WHERE rolname = %s",
        (role,),
    ).fetchone()
    if row is None:
        return "missing"
    return "member" if row[0] else "other"


def _plan(
    conn: psycopg.Connection[tuple[object, ...]], sql: str, policy: AgentPolicy, role: str
) -> tuple[str, Level] | None:
    try:
        with conn.transaction(force_rollback=True):
            conn.execute("SET TRANSACTION READ ONLY")
            if role == "member":
                conn.execute(f"SET LOCAL ROLE {quote_ident(policy.upstream_role)}")
            conn.execute(sql)
    except psycopg.errors.InsufficientPrivilege as exc:
        who = policy.upstream_role if role == "member" else "the login of --upstream"
        return (
            f"{who} may not run it: {exc.diag.message_primary} (apply `guardproxy roles` first)",
            "warning",
        )
    except psycopg.Error as exc:
        message = exc.diag.message_primary or str(exc)
        hint = f" ({exc.diag.message_hint})" if exc.diag.message_hint else ""
        return f"Postgres cannot plan it: {message}{hint}", "error"
    return None
