"""The `guardproxy` command. Thin: builds settings and calls into the package."""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from guardproxy import auditcli as audit_cli
from guardproxy.config import Settings, load_settings, parse_dsn
from guardproxy.mcp.cli import mcp_app
from guardproxy.onboarding import cli as onboarding_cli
from guardproxy.protocol.errors import ConfigError

if TYPE_CHECKING:
    from guardproxy.server.instances import SlotCell

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="guardproxy: a Postgres proxy that guards AI agents.",
)

Opt = typer.Option


def _about(setting: str) -> str:
    """The help of a `serve` flag: its setting's description (docs/configuration.md)."""
    return Settings.model_fields[setting].description or ""


def _fail(message: str) -> None:
    typer.echo(f"guardproxy: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def serve(
    config: Annotated[Path | None, Opt("--config", "-c", help="YAML settings file")] = None,
    listen_host: Annotated[str | None, Opt(help="address to listen on [127.0.0.1]")] = None,
    listen_port: Annotated[int | None, Opt(help="port to listen on [6432]")] = None,
    upstream: Annotated[
        str | None, Opt(help="upstream Postgres DSN; unset = embedded cluster")
    ] = None,
    pool_mode: Annotated[str | None, Opt(help="transaction | session")] = None,
    pool_size: Annotated[int | None, Opt(help="server connections per upstream role")] = None,
    reserve_pool_size: Annotated[int | None, Opt(help=_about("reserve_pool_size"))] = None,
    reserve_pool_timeout: Annotated[float | None, Opt(help=_about("reserve_pool_timeout"))] = None,
    max_client_conn: Annotated[int | None, Opt(help=_about("max_client_conn"))] = None,
    pool_acquire_timeout: Annotated[float | None, Opt(help="seconds before SQLSTATE 53300")] = None,
    server_connect_timeout: Annotated[
        float | None, Opt(help=_about("server_connect_timeout"))
    ] = None,
    server_idle_timeout: Annotated[float | None, Opt(help=_about("server_idle_timeout"))] = None,
    server_lifetime: Annotated[float | None, Opt(help=_about("server_lifetime"))] = None,
    client_login_timeout: Annotated[float | None, Opt(help=_about("client_login_timeout"))] = None,
    client_startup_timeout: Annotated[
        float | None, Opt(help=_about("client_startup_timeout"))
    ] = None,
    max_pending_logins: Annotated[int | None, Opt(help=_about("max_pending_logins"))] = None,
    auth_mode: Annotated[str | None, Opt(help="trust (loopback only) | scram | cert")] = None,
    tls_cert_file: Annotated[
        Path | None, Opt(help="server certificate (PEM) for client TLS")
    ] = None,
    tls_key_file: Annotated[Path | None, Opt(help="its private key (PEM)")] = None,
    tls_client_ca_file: Annotated[
        Path | None, Opt(help="CA of agents' client certificates")
    ] = None,
    tls_mode: Annotated[str | None, Opt(help="disable | allow | require")] = None,
    auth_max_failures: Annotated[
        int | None, Opt(help="failed logins per minute per address and agent id")
    ] = None,
    auth_file: Annotated[Path | None, Opt(help="SCRAM verifiers from `guardproxy passwd`")] = None,
    max_message_size: Annotated[int | None, Opt(help=_about("max_message_size"))] = None,
    max_statement_size: Annotated[int | None, Opt(help=_about("max_statement_size"))] = None,
    judge_offload_above: Annotated[int | None, Opt(help=_about("judge_offload_above"))] = None,
    judge_workers: Annotated[int | None, Opt(help=_about("judge_workers"))] = None,
    judge_timeout: Annotated[float | None, Opt(help=_about("judge_timeout"))] = None,
    client_idle_timeout: Annotated[
        float | None, Opt(help="close clients idle this long (0: never)")
    ] = None,
    audit_queue_size: Annotated[
        int | None, Opt(help="audit events held in memory before loss")
    ] = None,
    auto_prepare_after: Annotated[int | None, Opt(help=_about("auto_prepare_after"))] = None,
    max_prepared_statements: Annotated[
        int | None, Opt(help=_about("max_prepared_statements"))
    ] = None,
    workers: Annotated[int | None, Opt(help="worker processes sharing the port [1]")] = None,
    shutdown_timeout: Annotated[float | None, Opt(help=_about("shutdown_timeout"))] = None,
    advertise_address: Annotated[
        str | None,
        Opt(help="host:port other instances forward cancel requests to [listen address]"),
    ] = None,
    instance_heartbeat_interval: Annotated[
        float | None, Opt(help="seconds between instance registry heartbeats [10]")
    ] = None,
    instance_stale_after: Annotated[
        float | None, Opt(help="seconds before a silent instance's slot is reclaimed [60]")
    ] = None,
    policies: Annotated[
        Path | None, Opt(help="directory of policy YAML files (one per agent type)")
    ] = None,
    upstream_allow_cleartext: Annotated[
        bool | None,
        Opt(help="send the upstream password in cleartext if Postgres asks, over TLS only [off]"),
    ] = None,
    upstream_credentials_dir: Annotated[
        Path | None,
        Opt(help="directory of files named after upstream roles, holding their passwords"),
    ] = None,
    admin_users: Annotated[
        str | None, Opt(help="comma-separated agent ids allowed into the admin console")
    ] = None,
    metrics_host: Annotated[str | None, Opt(help="address of /metrics [127.0.0.1]")] = None,
    metrics_port: Annotated[
        int | None, Opt(help="port of /metrics, /healthz, /readyz; unset = off")
    ] = None,
    delegation_issuers: Annotated[
        str | None, Opt(help="JSON list of trusted delegation token issuers (docs/delegation.md)")
    ] = None,
    delegation_clock_skew: Annotated[
        float | None, Opt(help="seconds of clock skew tolerated on tokens [30]")
    ] = None,
    delegation_revocations_refresh: Annotated[
        float | None, Opt(help="seconds between reads of the revocation list [5]")
    ] = None,
    log_level: Annotated[str | None, Opt(help="debug | info | warning | error")] = None,
    embedded_data_dir: Annotated[Path | None, Opt(help="data dir of the embedded cluster")] = None,
) -> None:
    """Run the proxy. With no upstream, start and front a private embedded Postgres."""
    overrides: dict[str, Any] = {k: v for k, v in locals().items() if k != "config"}
    try:
        settings = load_settings(config, overrides)
    except ConfigError as exc:
        _fail(str(exc))
        return
    _setup_logging(settings.log_level)
    embedded = None
    if settings.upstream is None:
        from guardproxy import embedded as emb

        try:
            embedded = emb.ensure_running(settings.embedded_data_dir)
            example = Path("sql/example_schema.sql")
            if example.exists() and emb.seed_example(embedded, example, settings.policies):
                typer.echo(f"loaded the example shop schema ({example}) into the embedded database")
            from guardproxy.store import migrate

            migrate.upgrade(embedded.dsn)  # the embedded database always has the newest schema
        except ConfigError as exc:
            _fail(str(exc))
            return
        settings = settings.model_copy(update={"upstream": embedded.dsn})
    try:
        _run(settings, embedded is not None)
    finally:
        if embedded is not None:
            from guardproxy import embedded as emb

            emb.stop(embedded)


def _run(settings: Settings, embedded: bool) -> None:
    assert settings.upstream is not None
    upstream = parse_dsn(settings.upstream)
    host = settings.listen_host
    where = "the embedded Postgres" if embedded else f"{upstream.host}:{upstream.port}"
    if settings.workers == 1:
        _run_worker(settings, 0, where, None)
        return
    if settings.listen_port == 0:
        _fail("--workers needs a fixed --listen-port (they share it)")
    import multiprocessing
    import signal

    from guardproxy.server.instances import SlotCell

    # the instance's registry slot: worker 0 claims it, every worker puts it in its keys
    slot_cell = SlotCell(shared=True)
    ctx = multiprocessing.get_context("fork")
    children = [
        ctx.Process(target=_run_worker, args=(settings, i, where, slot_cell), daemon=False)
        for i in range(settings.workers)
    ]
    for child in children:
        child.start()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    print(f"guardproxy: {settings.workers} workers on {host}:{settings.listen_port}", flush=True)
    for child in children:
        child.join()


def _run_worker(settings: Settings, worker: int, where: str, slot_cell: SlotCell | None) -> None:
    import uvloop

    from guardproxy.server.app import Proxy

    assert settings.upstream is not None
    upstream = parse_dsn(settings.upstream)

    async def main() -> None:
        proxy = Proxy(settings, upstream, worker, slot_cell)
        try:
            await proxy.start()
        except OSError as exc:
            _fail(f"cannot listen on {settings.listen_host}:{settings.listen_port}: {exc.strerror}")
        if worker == 0:
            host = settings.listen_host
            print(
                f"guardproxy is up on {host}:{proxy.bound_port}, in front of {where} (database {upstream.database})"
            )
            print(_connect_help(settings, proxy.bound_port, upstream.database, proxy), flush=True)
        await proxy.serve_until_stopped()

    try:
        uvloop.run(main())
    except KeyboardInterrupt:
        pass
    except ConfigError as exc:
        _fail(str(exc))


def _connect_help(settings: Settings, port: int, database: str, proxy: Any) -> str:
    host = settings.listen_host
    agents = (
        [f"{p.agents[0].replace('*', '1')}" for p in proxy.policies]
        if proxy.policies
        else ["agent-1"]
    )
    lines = ["Connect as an agent (the user name is the agent id):"]
    lines += [f"  psql 'postgresql://{agent}@{host}:{port}/{database}'" for agent in agents]
    if settings.admin_users:
        lines.append(
            f"Admin console:  psql 'postgresql://{settings.admin_users[0]}@{host}:{port}/guardproxy'"
        )
    if settings.metrics_port is not None:
        lines.append(
            f"Metrics:        http://{settings.metrics_host}:{settings.metrics_port}/metrics"
        )
    lines.append("Stop with Ctrl-C.")
    return "\n".join(lines)


def _setup_logging(level: str) -> None:
    from guardproxy.logs import setup_logging

    setup_logging(level)


@app.command()
def passwd(
    name: Annotated[str, typer.Argument(help="agent id (the login user name)")],
    auth_file: Annotated[Path, Opt(help="file of SCRAM verifiers")] = Path("guardproxy.auth"),
    password_stdin: Annotated[
        bool, Opt("--password-stdin", help="read the password from stdin")
    ] = False,
) -> None:
    """Write a SCRAM-SHA-256 verifier for NAME into the auth file (never the password)."""
    from guardproxy.protocol.scram import write_verifier

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {name}: ")
        if password != getpass.getpass("again: "):
            _fail("the passwords differ")
    if not password:
        _fail("empty password")
    try:
        write_verifier(auth_file, name, password)
    except ConfigError as exc:
        _fail(str(exc))
    typer.echo(f"wrote a SCRAM-SHA-256 verifier for {name} to {auth_file}")


db_app = typer.Typer(no_args_is_help=True, help="guardproxy's own schema in the upstream database.")
app.add_typer(db_app, name="db")
UpstreamOpt = Annotated[
    str | None,
    Opt(
        "--upstream",
        envvar="GUARDPROXY_UPSTREAM",
        help="upstream DSN (a role that may create the schema)",
    ),
]


def _upstream_dsn(upstream: str | None) -> str:
    if upstream:
        return upstream
    from guardproxy import embedded

    try:
        return embedded.ensure_running().dsn
    except ConfigError as exc:
        _fail(str(exc))
        raise


@db_app.command("upgrade")
def db_upgrade(upstream: UpstreamOpt = None, revision: str = "head") -> None:
    """Create or update the guardproxy schema (audit log, idempotency ledger, task budgets)."""
    from guardproxy.store import migrate

    dsn = _upstream_dsn(upstream)
    migrate.upgrade(dsn, revision)
    typer.echo(f"guardproxy schema at revision {migrate.current_revision(dsn)}")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="target revision, or 'base'")],
    upstream: UpstreamOpt = None,
) -> None:
    """Step the guardproxy schema back to REVISION ('base' removes it)."""
    from guardproxy.store import migrate

    dsn = _upstream_dsn(upstream)
    migrate.downgrade(dsn, revision)
    typer.echo(f"guardproxy schema at revision {migrate.current_revision(dsn) or 'none'}")


@db_app.command("current")
def db_current(upstream: UpstreamOpt = None) -> None:
    """Print the schema's revision and whether it is the newest this guardproxy knows."""
    from guardproxy.store import migrate

    current = migrate.current_revision(_upstream_dsn(upstream))
    head = migrate.head_revision()
    state = (
        "up to date"
        if current == head
        else f"behind (newest is {head}): run `guardproxy db upgrade`"
    )
    typer.echo(f"{current or 'none'} ({state})")
    if current != head:
        raise typer.Exit(1)


@app.command()
def top(
    dsn: Annotated[
        str, Opt(help="admin console DSN (database guardproxy)")
    ] = "postgresql://admin@127.0.0.1:6432/guardproxy",
    interval: Annotated[float, Opt(help="seconds between refreshes")] = 1.0,
    iterations: Annotated[int | None, Opt(help="stop after N refreshes (default: until q)")] = None,
) -> None:
    """Live view of agents ranked by DB time, from the admin console; q quits."""
    from guardproxy import top as top_view

    try:
        top_view.run(dsn, interval, iterations)
    except KeyboardInterrupt:
        pass


PoliciesOpt = Annotated[
    Path, Opt("--policies", envvar="GUARDPROXY_POLICIES", help="policy directory")
]

# init, soft-delete sql, check, explain, roles, replay
onboarding_cli.register(app)


# audit deletes|writes|denials|task, undo
audit_cli.register(app)


@app.command()
def demo(
    upstream: Annotated[
        str | None,
        Opt("--upstream", help="a fresh database to play in (default: the embedded one)"),
    ] = None,
    policies: PoliciesOpt = Path("policies"),
    schema: Annotated[Path, Opt("--schema", help="the example schema")] = Path(
        "sql/example_schema.sql"
    ),
) -> None:
    """Scripted agents of the three example types, then the audit of deletes and DB time per agent."""
    from guardproxy import demo as demo_run
    from guardproxy import embedded

    if upstream is None:
        emb = embedded.ensure_running()
        embedded.seed_example(emb, schema, policies)
        upstream = emb.dsn
    else:
        embedded.seed_database(upstream, schema, policies)
    demo_run.run(upstream, policies, typer.echo)


def _register_token_commands() -> None:
    from guardproxy.delegation.commands import token_app

    app.add_typer(token_app, name="token")


_register_token_commands()
app.add_typer(mcp_app, name="mcp")  # the MCP front door: guardproxy/mcp/


def main() -> None:
    app()


if __name__ == "__main__":
    main()
