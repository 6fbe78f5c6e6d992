"""What the CLI's command modules share: failing with a message, common options,
and the upstream a command reads (never an embedded cluster it would start)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

Opt = typer.Option


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"guardproxy: {message}", err=True)
    raise typer.Exit(code)


UpstreamOpt = Annotated[
    str | None,
    Opt(
        "--upstream",
        envvar="GUARDPROXY_UPSTREAM",
        help="upstream DSN (postgresql://user:password@host:port/db)",
    ),
]
PoliciesOpt = Annotated[
    Path, Opt("--policies", envvar="GUARDPROXY_POLICIES", help="policy directory")
]
SchemaOpt = Annotated[
    Path | None,
    Opt("--schema", help="SQL schema script (CREATE / ALTER TABLE, pg_dump -s) to read offline"),
]


def policy_set(directory: Path) -> Any:
    from guardproxy.policy import PolicyError, load_policy_set

    try:
        return load_policy_set(directory)
    except PolicyError as exc:
        fail(
            "the policies do not load:\n  " + "\n  ".join(exc.errors) + "\n(run `guardproxy check`)"
        )


def read_schema(upstream: str | None, schema: Path | None) -> Any:
    """The `DbSchema` of --upstream or --schema, None when neither is given."""
    from guardproxy.onboarding.schema import DbSchema

    if upstream:
        import psycopg

        from guardproxy.onboarding.introspect import read_schema as read_live

        try:
            return read_live(upstream)
        except psycopg.Error as exc:
            fail(f"cannot read the catalog of --upstream: {str(exc).strip()}")
    if schema is not None:
        try:
            return DbSchema.from_ddl(schema.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            fail(f"--schema {schema}: {exc}")
    return None


def required_upstream(upstream: str | None, command: str) -> str:
    """The DSN a command that reads guardproxy's schema uses: --upstream or
    GUARDPROXY_UPSTREAM, or the embedded cluster only when it is already running."""
    if upstream:
        return upstream
    running = running_embedded_dsn()
    if running:
        return running
    fail(
        f"{command} needs the database guardproxy writes its audit log to: give --upstream DSN "
        "or set GUARDPROXY_UPSTREAM (the embedded cluster of `guardproxy serve` is used only "
        "while it runs)"
    )


def running_embedded_dsn() -> str | None:
    """The DSN of the embedded cluster if it exists and accepts connections; never starts it."""
    import json
    import socket

    from guardproxy import embedded

    meta_file = embedded.default_home() / "guardproxy-embedded.json"
    try:
        meta = json.loads(meta_file.read_text())
        emb = embedded.Embedded(meta_file.parent, int(meta["port"]), str(meta["password"]))
        socket.create_connection(("127.0.0.1", emb.port), timeout=1).close()
    except (OSError, ValueError, KeyError):
        return None
    return emb.dsn
