"""The embedded default: a private Postgres cluster for `guardproxy serve` with no upstream.

Data lives under the user's state dir (``/var/lib/guardproxy/embedded`` for
root, because initdb refuses root and runs as ``postgres``), listens on
loopback only, and is reused across runs. Its credentials are generated once
and kept beside the data, readable by the owner only.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from guardproxy.protocol.errors import ConfigError

DATABASE = "app"
ROLE = "app"


@dataclass(frozen=True)
class Embedded:
    home: Path
    port: int
    password: str

    @property
    def dsn(self) -> str:
        return f"postgresql://{ROLE}:{self.password}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def datadir(self) -> Path:
        return self.home / "data"


def pg_bindir() -> Path:
    found = os.environ.get("GUARDPROXY_PG_BINDIR")
    if not found:
        pg_config = shutil.which("pg_config")
        if pg_config:
            found = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=False
            ).stdout.strip()
    for candidate in (found, "/usr/lib/postgresql/15/bin"):
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    raise ConfigError(
        "the embedded default needs the PostgreSQL server binaries (initdb, pg_ctl), which were not "
        "found: install postgresql, set GUARDPROXY_PG_BINDIR, or pass --upstream DSN"
    )


def default_home() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/guardproxy/embedded")
    return Path(platformdirs.user_state_dir("guardproxy")) / "embedded"


def _run(cmd: list[str], as_postgres: bool) -> subprocess.CompletedProcess[str]:
    if as_postgres:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_running(home: Path | None = None) -> Embedded:
    """Creates the cluster on first use, starts it if it is not running, returns how to reach it."""
    home = home or default_home()
    as_postgres = os.geteuid() == 0
    bindir = pg_bindir()
    meta_file = home / "guardproxy-embedded.json"
    home.mkdir(parents=True, exist_ok=True)
    if as_postgres:
        shutil.chown(home, "postgres", "postgres")
    if not meta_file.exists():
        meta = {"port": _free_port(), "password": secrets.token_urlsafe(18)}
        _initdb(bindir, home, meta, as_postgres)
        meta_file.write_text(json.dumps(meta))
        os.chmod(meta_file, 0o600)
    meta = json.loads(meta_file.read_text())
    emb = Embedded(home, int(meta["port"]), str(meta["password"]))
    status = _run([str(bindir / "pg_ctl"), "-D", str(emb.datadir), "status"], as_postgres)
    if status.returncode != 0:
        started = _run(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(emb.datadir),
                "-w",
                "-t",
                "60",
                "-l",
                str(home / "postgres.log"),
                "start",
            ],
            as_postgres,
        )
        if started.returncode != 0:
            raise ConfigError(
                f"the embedded Postgres in {emb.datadir} did not start: {started.stderr.strip()} "
                f"(see {home / 'postgres.log'})"
            )
    return emb


def stop(emb: Embedded) -> None:
    _run(
        [str(pg_bindir() / "pg_ctl"), "-D", str(emb.datadir), "-w", "-m", "fast", "stop"],
        os.geteuid() == 0,
    )


def _initdb(bindir: Path, home: Path, meta: dict[str, object], as_postgres: bool) -> None:
    datadir = home / "data"
    pwfile = home / "initdb.pw"
    pwfile.write_text(str(meta["password"]))
    if as_postgres:
        shutil.chown(pwfile, "postgres", "postgres")
    try:
        done = _run(
            [
                str(bindir / "initdb"),
                "-D",
                str(datadir),
                "-U",
                ROLE,
                f"--pwfile={pwfile}",
                "-A",
                "scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
            as_postgres,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        raise ConfigError(f"initdb of the embedded cluster failed: {done.stderr.strip()}")
    with (datadir / "postgresql.auto.conf").open("a") as f:
        f.write(
            f"listen_addresses = '127.0.0.1'\nport = {meta['port']}\n"
            f"unix_socket_directories = '{home}'\nshared_preload_libraries = 'pg_stat_statements'\n"
        )
    ctl = str(bindir / "pg_ctl")
    started = _run(
        [ctl, "-D", str(datadir), "-w", "-l", str(home / "postgres.log"), "start"], as_postgres
    )
    if started.returncode != 0:
        raise ConfigError(f"the new embedded cluster did not start: {started.stderr.strip()}")
    psql = str(bindir / "psql")
    env_cmd = ["env", f"PGPASSWORD={meta['password']}"]
    created = _run(
        [
            *env_cmd,
            psql,
            "-X",
            "-q",
            "-h",
            str(home),
            "-p",
            str(meta["port"]),
            "-U",
            ROLE,
            "-d",
            "postgres",
            "-c",
            f"CREATE DATABASE {DATABASE}",
        ],
        as_postgres,
    )
    if created.returncode != 0:
        raise ConfigError(f"creating the embedded database failed: {created.stderr.strip()}")


def seed_example(emb: Embedded, schema_sql: Path, policies: Path | None) -> bool:
    """Loads the example shop schema, guardproxy's own schema and the agent roles, once.

    Returns True when it seeded now, False when it had been done before.
    """
    marker = emb.home / "guardproxy-example-seeded"
    if marker.exists():
        return False
    seed_database(emb.dsn, schema_sql, policies)
    marker.write_text("seeded\n")
    return True


def seed_database(dsn: str, schema_sql: Path, policies: Path | None) -> None:
    """Example schema, guardproxy's schema, and the policies' roles granted to the DSN's login role."""
    import psycopg

    from guardproxy.store import migrate

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(schema_sql.read_text())  # a trusted file of our own
    migrate.upgrade(dsn)
    if policies is not None:
        from guardproxy.policy import Catalog, load_policy_set
        from guardproxy.policy.tools import roles_sql

        policy_set = load_policy_set(policies)
        sql = roles_sql(policy_set, Catalog.from_ddl(schema_sql.read_text()))
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql)
            login = conn.execute("SELECT session_user").fetchone()
            assert login is not None
            for policy in policy_set:
                conn.execute(f'GRANT "{policy.upstream_role}" TO "{login[0]}"')
