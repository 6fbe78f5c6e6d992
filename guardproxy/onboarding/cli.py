"""The commands that take a new user from a database to a policy: ``init``,
``soft-delete sql``, ``check``, ``explain``, ``roles``, ``replay``.

Thin: parse options, read the schema (`cliutil.read_schema`), call the pure code,
print. `register(app)` adds them to the ``guardproxy`` command.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..cliutil import Opt, PoliciesOpt, SchemaOpt, UpstreamOpt, fail, policy_set, read_schema

soft_delete_app = typer.Typer(
    no_args_is_help=True, help="Prepare tables for soft_delete (the columns and indexes it needs)."
)


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.add_typer(soft_delete_app, name="soft-delete")
    app.command("check")(check)
    app.command("explain")(explain)
    app.command("roles")(roles)
    app.command("replay")(replay)


def init(
    upstream: UpstreamOpt = None,
    schema: SchemaOpt = None,
    agent_type: Annotated[
        str, Opt("--agent-type", help="name of the agent type (the policy file's name)")
    ] = "agent",
    output: Annotated[
        Path | None, Opt("--output", "-o", help="write the policy here instead of to stdout")
    ] = None,
) -> None:
    """Write a commented policy skeleton for every table of the database.

    Nothing is allowed until lines are uncommented; likely personal-data columns are
    already in deny_columns, soft-delete and append-only candidates are marked.
    """
    import re

    from .skeleton import policy_skeleton, summary

    if not re.match(r"^[a-z][a-z0-9_-]{0,62}$", agent_type):
        fail(f"--agent-type {agent_type!r}: lower-case letters, digits, '_' and '-'")
    db = read_schema(upstream, schema)
    if db is None:
        fail("init reads the tables from a database: give --upstream DSN (or --schema FILE)")
    source = _describe_source(upstream, schema)
    text = policy_skeleton(db, agent_type, source)
    if output is None:
        typer.echo(text, nl=False)
    else:
        if output.exists():
            fail(f"{output} exists: init does not overwrite a policy")
        output.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {output}", err=True)
    for line in summary(db):
        typer.echo(f"guardproxy init: {line}", err=True)


def _describe_source(upstream: str | None, schema: Path | None) -> str:
    if upstream:
        from guardproxy.config import parse_dsn

        try:
            up = parse_dsn(upstream)
        except ValueError:
            return "the upstream database"
        return f"database {up.database} on {up.host}:{up.port}"
    return f"the schema script {schema}"


@soft_delete_app.command("sql")
def soft_delete_sql(
    tables: Annotated[
        list[str], typer.Argument(help="tables to prepare, e.g. tickets sales.orders")
    ],
    policies: Annotated[
        Path | None,
        Opt("--policies", help="take the soft-delete column names from these policies"),
    ] = None,
    upstream: UpstreamOpt = None,
    schema: SchemaOpt = None,
) -> None:
    """Print the ALTER TABLE and indexes soft_delete needs for each TABLE (run it yourself)."""
    from guardproxy.policy.agent import SoftDelete
    from guardproxy.policy.names import parse_relation_name
    from guardproxy.policy.tools import soft_delete_sql as ddl

    db = read_schema(upstream, schema)
    chosen = policy_set(policies) if policies is not None else None
    parts = []
    for table in tables:
        try:
            schema_name, name = parse_relation_name(table)
        except ValueError as exc:
            fail(str(exc))
        columns: SoftDelete | None = None
        for policy in chosen or ():
            rule = next((t for t in policy.tables if t.key == table and t.soft_delete), None)
            if rule is not None:
                columns = rule.soft_delete
        key = None
        if db is not None:
            found = db.resolve(schema_name, name)
            if found is None:
                fail(
                    f"no table {table} in the database (tables: {', '.join(t.name for t in db.tables)})"
                )
            key = found.primary_key or None
        parts.append(ddl(table, columns, key))
    typer.echo("\n".join(parts), nl=False)


def check(
    policies: PoliciesOpt = Path("policies"),
    upstream: Annotated[
        str | None,
        Opt("--upstream", help="also check every name and row filter against this database"),
    ] = None,
    schema: SchemaOpt = None,
) -> None:
    """Validate the policies; with --upstream (or --schema) against the database too.

    Prints a summary per agent type, or every problem with its file and line (exit 1).
    """
    from guardproxy.policy.tools import check_report

    code, text = check_report(policies)
    if code != 0 or (upstream is None and schema is None):
        typer.echo(text, err=code != 0)
        raise typer.Exit(code)
    from .dbcheck import catalog_findings, plan_findings

    chosen = policy_set(policies)
    db = read_schema(upstream, schema)
    findings = catalog_findings(chosen, db)
    if upstream:
        try:
            findings += plan_findings(chosen, db, upstream)
        except Exception as exc:  # psycopg.Error: the database went away between the reads
            fail(f"cannot plan the row filters on --upstream: {str(exc).strip()}")
    findings.sort(key=lambda f: (str(f.file), f.line or 0))
    errors = [f for f in findings if f.level == "error"]
    against = _describe_source(upstream, schema)
    for finding in findings:
        typer.echo(str(finding), err=bool(errors))
    if errors:
        warnings = sum(f.level == "warning" for f in findings)
        typer.echo(
            f"policy check against {against} failed: {len(errors)} error"
            f"{'s' if len(errors) != 1 else ''}, {warnings} warning{'s' if warnings != 1 else ''}",
            err=True,
        )
        raise typer.Exit(1)
    typer.echo(text.replace(": OK", f": OK (checked against {against})", 1))


def explain(
    agent: Annotated[str, Opt("--agent", help="agent id (login name)")],
    sql: Annotated[str | None, typer.Argument(help="the SQL an agent would send")] = None,
    policies: PoliciesOpt = Path("policies"),
    upstream: UpstreamOpt = None,
    schema: SchemaOpt = None,
    principals: Annotated[
        str | None, Opt("--principals", help="comma-separated, as SET guard.principals")
    ] = None,
    task: Annotated[str | None, Opt("--task", help="the context's task")] = None,
    step: Annotated[str | None, Opt("--step", help="the context's step")] = None,
    tag: Annotated[
        list[str] | None, Opt("--tag", help="a context tag NAME=VALUE (repeatable), e.g. reason=x")
    ] = None,
    as_json: Annotated[
        bool, Opt("--json", help="one JSON object: decision, rule, reason, hint, sql, notices")
    ] = False,
    token: Annotated[
        Path | None, Opt("--token", help="delegation token file (- for stdin): effective rules")
    ] = None,
    key: Annotated[Path | None, Opt("--key", help="verify the token with this key file")] = None,
    config: Annotated[
        Path | None, Opt("--config", help="verify the token with these settings' issuers")
    ] = None,
) -> None:
    """What guardproxy would do with SQL from AGENT: allow / deny / rewrite, the rule, the reason, the SQL sent.

    With --token: the rules in effect for AGENT with that delegation token (narrowed by
    it), and the decision on SQL, if given. Exit code 0 when allowed (or rewritten), 1
    when denied or the token is refused.
    """
    from guardproxy.policy import SessionContext

    if token is not None:
        from guardproxy.delegation.commands import explain_token

        db = read_schema(upstream, schema)
        code, text = explain_token(
            policy_set(policies), agent, token, sql, db.catalog() if db else None, config, key
        )
        typer.echo(text, err=code == 2)
        raise typer.Exit(code)
    if sql is None:
        fail("give the SQL to explain, or --token FILE for an agent's effective rules")
        return
    from guardproxy.policy.tools import explain as explain_sql
    from guardproxy.policy.tools import explain_text

    updates = {"principals": principals or "", "task": task or "", "step": step or ""}
    for item in tag or ():
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            fail(f"--tag {item!r}: expected NAME=VALUE")
        updates[name.strip()] = value
    ctx = SessionContext(agent_id=agent).with_updates(updates)
    db = read_schema(upstream, schema)
    catalog = db.catalog() if db is not None else None
    result = explain_sql(policy_set(policies), agent, sql, catalog, ctx)
    if as_json:
        keys = ("decision", "rule", "reason", "hint", "sql", "notices")
        typer.echo(json.dumps({k: result.get(k) for k in keys}))
    else:
        typer.echo(explain_text(result))
    raise typer.Exit(1 if result["decision"] == "deny" else 0)


def roles(
    policies: PoliciesOpt = Path("policies"),
    upstream: UpstreamOpt = None,
    schema: SchemaOpt = None,
    proxy_login: Annotated[
        str | None,
        Opt(
            "--proxy-login",
            help="the role guardproxy logs in as (default: the user of --upstream): it gets "
            "the upstream roles and its rights on the guardproxy schema",
        ),
    ] = None,
    rls: Annotated[
        list[str] | None,
        Opt(
            "--rls",
            help="TABLE:COLUMN[:TYPE] (repeatable): also row-level security on TABLE: agent "
            "types with delegation tokens see only the rows whose COLUMN holds one of their "
            "token's principals; TYPE comes from --upstream / --schema when not given",
        ),
    ] = None,
) -> None:
    """Print one SQL script to review and run: roles, grants, settings, the proxy login's needs.

    It gives the database the policies' limits (defence in depth) and guardproxy's own
    login what it needs: membership in the agent roles, rights in guardproxy's schema.
    With --rls, it ends with the row-level security policy of each table named
    (docs/delegation.md, "Into Postgres: row-level security").
    """
    from guardproxy.policy.tools import roles_sql

    login = proxy_login
    if login is None and upstream:
        from guardproxy.config import parse_dsn

        login = parse_dsn(upstream).user
    db = read_schema(upstream, schema)
    chosen = policy_set(policies)
    parts = [roles_sql(chosen, db, proxy_login=login)]
    parts += [_rls_policy(chosen, db, spec) for spec in rls or ()]
    typer.echo("\n".join(parts), nl=False)


def _rls_policy(chosen: Any, db: Any, spec: str) -> str:
    """The RLS policy of one ``--rls TABLE:COLUMN[:TYPE]`` (delegation/postgres.py writes
    it); the column must exist when the schema is known, and gives its type."""
    from guardproxy.delegation.postgres import rls_for_policy_set
    from guardproxy.policy.names import parse_relation_name

    table, _, rest = spec.partition(":")
    column, _, column_type = rest.partition(":")
    if not table.strip() or not column.strip():
        fail(f"--rls {spec!r}: expected TABLE:COLUMN or TABLE:COLUMN:TYPE, e.g. orders:customer_id")
    table, column, column_type = table.strip(), column.strip(), column_type.strip()
    if db is not None:
        try:
            found = db.resolve(*parse_relation_name(table))
        except ValueError as exc:
            fail(f"--rls {spec!r}: {exc}")
        if found is None:
            fail(f"--rls {spec!r}: no table {table} in the database")
        described = found.column(column)
        if described is None:
            fail(
                f"--rls {spec!r}: table {table} has no column {column} "
                f"(columns: {', '.join(found.column_names)})"
            )
        column_type = column_type or described.type
    try:
        return str(rls_for_policy_set(chosen, table, column, column_type or None))
    except ValueError as exc:
        fail(f"--rls {spec!r}: {exc}")


def replay(
    policies: PoliciesOpt = Path("policies"),
    agent_type: Annotated[str, Opt("--agent-type", help="judge as this agent type")] = "",
    source: Annotated[
        str,
        Opt(
            "--from",
            help="a file of statements (SQL separated by ';', one JSON string per line, or a "
            "csvlog), 'csvlog:FILE', or 'pg_stat_statements' (needs --upstream)",
        ),
    ] = "",
    upstream: UpstreamOpt = None,
    schema: SchemaOpt = None,
    agent: Annotated[
        str | None, Opt("--agent", help="agent id to judge as [the type's first pattern]")
    ] = None,
    user: Annotated[
        str | None,
        Opt("--user", help="only statements of this database user (csvlog, pg_stat_statements)"),
    ] = None,
    principals: Annotated[
        str | None, Opt("--principals", help="context principals for row filters")
    ] = None,
    examples: Annotated[int, Opt("--examples", help="example statements per rule")] = 2,
    as_json: Annotated[bool, Opt("--json", help="the summary as JSON")] = False,
) -> None:
    """What a policy would have done to past statements: allowed, rewritten, denied, by rule.

    The statements go through the judge only, never to a database; a monitor-mode policy
    is replayed as if enforced.
    """
    from . import replay as replaying

    if not agent_type or not source:
        fail("replay needs --agent-type TYPE and --from FILE | csvlog:FILE | pg_stat_statements")
    chosen = policy_set(policies)
    policy = chosen.get(agent_type)
    if policy is None:
        fail(
            f"no agent type {agent_type!r} in {policies} (types: {', '.join(p.name for p in chosen)})"
        )
    try:
        statements = replaying.read_source(source, upstream, user)
    except (OSError, ValueError) as exc:
        fail(str(exc))
    db = read_schema(upstream, schema)
    summary = replaying.replay(
        chosen,
        policy,
        statements,
        catalog=db.catalog() if db is not None else None,
        agent_id=agent,
        principals=principals,
        examples=examples,
        source=source,
    )
    if as_json:
        typer.echo(json.dumps(summary.as_dict(), indent=1))
    else:
        typer.echo(summary.text())
    sys.stdout.flush()
