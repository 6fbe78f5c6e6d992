"""``guardproxy init``: a commented policy skeleton for every table of a database.

`policy_skeleton(schema, agent_type, source)` returns the text of a policy file
that loads as it is and allows nothing but transaction control: every table is
there, commented out, with its columns, the operations to choose from and what
the database suggests:

* columns whose names look like personal data or secrets (`personal`) in a
  ``deny_columns`` line that is *not* commented inside the table's entry, so
  uncommenting a table keeps them out;
* ``soft_delete: true`` when the table has the three soft-delete columns, or the
  ``guardproxy soft-delete sql`` command that adds them when it has a primary key
  (undo needs one);
* ``append_only: true`` for tables named like logs and histories;
* a ``row_filters`` example for a column that looks like a tenant key.

Uncommenting a table means removing one ``# `` from each of its lines; the
options inside stay commented until their own ``# `` goes too.
"""

from __future__ import annotations

import json
import re
import textwrap

from .personal import personal_columns, words
from .schema import DbSchema, Table

_APPEND_ONLY_WORDS = frozenset(
    {"log", "logs", "history", "histories", "event", "events", "audit", "journal", "ledger"}
)
_TENANT_KEYS = (
    "organization_id",
    "organisation_id",
    "org_id",
    "tenant_id",
    "account_id",
    "company_id",
    "customer_id",
    "workspace_id",
)
_SOFT = ("deleted_at", "deleted_by", "delete_reason")
_PLAIN = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?$")
_WIDTH = 96


def yaml_name(text: str) -> str:
    """A YAML scalar for a policy key or column name: bare when plain, quoted otherwise."""
    return text if _PLAIN.match(text) else json.dumps(text)


def _sql_name(name: str) -> str:
    return name if re.match(r"^[a-z_][a-z0-9_]*$", name) else '"' + name.replace('"', '""') + '"'


def table_key(table: Table, schema: DbSchema) -> str:
    """How a policy names the table: unqualified when the search path finds it."""
    bare = _sql_name(table.name)
    if schema.catalog().resolve(None, table.name) == (table.schema, table.name):
        return bare
    return f"{_sql_name(table.schema)}.{bare}"


def _list(names: list[str] | tuple[str, ...]) -> str:
    return "[" + ", ".join(yaml_name(_sql_name(n)) for n in names) + "]"


def _list_lines(prefix: str, key: str, names: list[str] | tuple[str, ...]) -> list[str]:
    """``key: [a, b, ...]`` at `prefix`, continued on lines indented two more (a YAML
    flow sequence may span lines), each at most `_WIDTH` wide."""
    return textwrap.wrap(
        f"{key}: {_list(names)}",
        _WIDTH,
        initial_indent=prefix,
        subsequent_indent=prefix + "  ",
        break_on_hyphens=False,
        break_long_words=False,
    )


def _wrapped(prefix: str, text: str) -> list[str]:
    return textwrap.wrap(
        text, _WIDTH, initial_indent=prefix, subsequent_indent=prefix + "  ", break_on_hyphens=False
    )


def looks_append_only(table: Table) -> bool:
    return bool(_APPEND_ONLY_WORDS & set(words(table.name)))


def soft_delete_ready(table: Table) -> bool:
    return all(table.column(c) is not None for c in _SOFT)


def tenant_column(table: Table) -> str | None:
    return next((c for c in _TENANT_KEYS if table.column(c) is not None), None)


def _table_entry(table: Table, schema: DbSchema, agent_type: str) -> list[str]:
    key = table_key(table, schema)
    personal = personal_columns(table.column_names)
    lines = _wrapped("  ## ", f"{key} ({table.kind}): {', '.join(table.column_names)}")
    lines += [f"  # {yaml_name(key)}:"]
    ops = "select" if table.kind != "table" else "select, insert, update, delete"
    lines.append(f"  #   ops: [select]                 # choose from: {ops}")
    if personal:
        kinds = ", ".join(f"{c}: {k}" for c, k in personal.items())
        lines += _list_lines("  #   ", "deny_columns", list(personal))
        lines += _wrapped("  #   ## ", f"look like personal data or secrets ({kinds})")
    readable = [c for c in table.column_names if c not in personal]
    lines += _list_lines("  #   # ", "columns", readable)
    if table.kind == "table":
        writable = [
            c.name
            for c in table.columns
            if c.name not in personal and not c.identity and not c.sequence and c.name not in _SOFT
        ]
        lines += _list_lines("  #   # ", "update_columns", writable)
        lines += _list_lines("  #   # ", "insert_columns", writable)
        lines += _write_safety(table, key)
    return lines


def _write_safety(table: Table, key: str) -> list[str]:
    if looks_append_only(table):
        return ["  #   # append_only: true           # named like a log: inserts only"]
    if soft_delete_ready(table):
        return [
            "  #   # soft_delete: true           # it has deleted_at, deleted_by, delete_reason"
        ]
    if table.primary_key:
        return [
            "  #   # soft_delete: true           # a DELETE marks rows instead of removing them;",
            f"  #   ## add the columns first: guardproxy soft-delete sql {key} --upstream DSN",
            "  #   # max_rows_affected: 100",
        ]
    return ["  #   # max_rows_affected: 100       # no primary key: no soft delete, no undo"]


def policy_skeleton(schema: DbSchema, agent_type: str, source: str) -> str:
    """The text of a policy file for `agent_type` (see the module docstring)."""
    role = "guard_" + re.sub(r"[^a-z0-9_]", "_", agent_type)
    tables = sorted(schema.tables, key=lambda t: (t.schema, t.name))
    out = [
        *_wrapped(
            "# ",
            f"Policy of agent type {agent_type!r}, written by `guardproxy init` from {source}.",
        ),
        "# It allows nothing yet: a table stays unusable until its lines are uncommented",
        "# (remove one '# ' per line). Then check it against the database:",
        "#   guardproxy check --policies DIR --upstream DSN",
        "# Every key is explained in docs/policies.md.",
        "description: >",
        f"  Agents of type {agent_type}: say what they are for.",
        f'agents: ["{agent_type}-*"]'.ljust(32) + "# login user names of this type (globs)",
        f"upstream_role: {role}".ljust(32) + "# the Postgres role its statements run as",
        "mode: enforce                   # monitor: deny nothing, log what would be denied",
        "",
        "statements: [read]              # add write for insert, update, delete",
        "",
        "tables:",
    ]
    for table in tables:
        out += _table_entry(table, schema, agent_type)
        out.append("")
    functions = sorted(f"{s}.{n}" if s != schema.search_path[0] else n for s, n in schema.functions)
    out += [
        "functions:",
        "  default: deny                 # built-in functions only (minus the side-effect list)",
    ]
    if functions:
        out += _wrapped("  # allow: ", "[" + ", ".join(yaml_name(f) for f in functions) + "]")
        out[-1] += "   # the database's own functions"
    out += [
        "",
        "require_where: true             # UPDATE and DELETE need a WHERE",
        "allow_locking: false",
        "",
        "timeouts:",
        "  statement_timeout: 5s",
        "  idle_in_transaction_timeout: 30s",
        "",
        "limits:",
        "  max_rows_returned: 1000       # a read returns at most this many rows",
        "  # max_rows_affected: 100      # a write changing more rows is undone",
    ]
    filters = [(t, tenant_column(t)) for t in tables]
    filters = [(t, c) for t, c in filters if c is not None]
    if filters:
        out += [
            "",
            "# Rows an agent may see, by the principals it works for (SET guard.principals):",
            "# row_filters:",
        ]
        for table, column in filters:
            key = yaml_name(table_key(table, schema))
            out.append(f'#   {key}: "{column} = ANY({{principals}})"')
    return "\n".join(out) + "\n"


def summary(schema: DbSchema) -> list[str]:
    """What init found, for the operator (stderr)."""
    lines = [f"{len(schema.tables)} tables and views"]
    flagged = [f"{t.name}.{c}" for t in schema.tables for c in personal_columns(t.column_names)]
    if flagged:
        lines.append("personal data or secrets, in deny_columns: " + ", ".join(flagged))
    candidates = [
        t.name
        for t in schema.tables
        if t.kind == "table"
        and t.primary_key
        and not looks_append_only(t)
        and not soft_delete_ready(t)
    ]
    if candidates:
        lines.append(
            "soft delete needs columns these tables do not have: "
            + ", ".join(candidates)
            + " (guardproxy soft-delete sql TABLE prints the ALTER TABLE)"
        )
    return lines
