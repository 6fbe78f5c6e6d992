"""A real PostgreSQL 15 cluster for the test session.

Started with initdb into a temporary directory (through ``runuser -u postgres``
when the tests run as root, since initdb refuses root), listening on loopback
only, or taken from ``GUARDPROXY_TEST_PG`` (a superuser DSN of an existing
server). Roles made here cover every server-side auth method the proxy speaks:
``app_owner`` (SCRAM), ``md5_user`` (md5) and ``trust_user`` (trust).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

PG_BINDIR = (
    os.environ.get("GUARDPROXY_PG_BINDIR")
    or subprocess.run(
        ["pg_config", "--bindir"], capture_output=True, text=True, check=False
    ).stdout.strip()
    or "/usr/lib/postgresql/15/bin"
)

APP_DB = "app"
PASSWORDS = {"postgres": "postgres_pw", "app_owner": "app_pw", "md5_user": "md5_pw"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


@dataclass
class PgCluster:
    host: str
    port: int
    datadir: str | None  # None when the server is not ours to stop
    as_postgres: bool
    socket_dir: str | None = None  # local socket (trust) for setup, when the server is ours

    def dsn(
        self, user: str = "app_owner", dbname: str = APP_DB, password: str | None = None
    ) -> str:
        pw = PASSWORDS.get(user, "") if password is None else password
        auth = quote(user, safe="") + (":" + quote(pw, safe="") if pw else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def psql(self, sql: str, user: str = "postgres", dbname: str = APP_DB) -> str:
        env = dict(os.environ, PGPASSWORD=PASSWORDS.get(user, ""))
        out = subprocess.run(
            [
                f"{PG_BINDIR}/psql",
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.socket_dir or self.host,
                "-p",
                str(self.port),
                "-U",
                user,
                "-d",
                dbname,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"psql failed: {out.stderr}")
        return out.stdout.strip()

    def pg_ctl(self, *args: str) -> None:
        assert self.datadir is not None, "cannot control a server the tests did not start"
        run_as_owner(
            [f"{PG_BINDIR}/pg_ctl", "-D", self.datadir, "-w", "-t", "60", *args], self.as_postgres
        )

    def stop(self) -> None:
        self.pg_ctl("stop", "-m", "fast")

    def start(self) -> None:
        self.pg_ctl("start", "-l", f"{self.datadir}/server.log")


def run_as_owner(cmd: list[str], as_postgres: bool) -> None:
    if as_postgres:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{out.stdout}\n{out.stderr}")


HBA = """\
local all all trust
host all trust_user 127.0.0.1/32 trust
host all md5_user 127.0.0.1/32 md5
host all all 127.0.0.1/32 scram-sha-256
"""


@contextlib.contextmanager
def started_cluster() -> Iterator[PgCluster]:
    existing = os.environ.get("GUARDPROXY_TEST_PG")
    if existing:
        yield _adopt(existing)
        return
    as_postgres = os.geteuid() == 0
    top = tempfile.mkdtemp(prefix="guardproxy-pg-")
    datadir = os.path.join(top, "data")
    if as_postgres:
        shutil.chown(top, "postgres", "postgres")
    port = free_port()
    run_as_owner(
        [
            f"{PG_BINDIR}/initdb",
            "-D",
            datadir,
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ],
        as_postgres,
    )
    with open(os.path.join(datadir, "pg_hba.conf"), "w") as f:
        f.write(HBA)
    with open(os.path.join(datadir, "postgresql.auto.conf"), "a") as f:
        f.write(
            f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{top}'\n"
            "max_connections = 300\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            "shared_buffers = 128MB\nshared_preload_libraries = 'pg_stat_statements'\n"
            "log_min_messages = warning\n"
        )
    cluster = PgCluster("127.0.0.1", port, datadir, as_postgres, top)
    cluster.start()
    try:
        _bootstrap(cluster)
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            run_as_owner(
                [f"{PG_BINDIR}/pg_ctl", "-D", datadir, "-w", "stop", "-m", "immediate"], as_postgres
            )
        shutil.rmtree(top, ignore_errors=True)


def _bootstrap(cluster: PgCluster) -> None:
    cluster.psql(
        f"ALTER ROLE postgres PASSWORD '{PASSWORDS['postgres']}';"
        f"CREATE ROLE app_owner LOGIN PASSWORD '{PASSWORDS['app_owner']}';"
        "CREATE ROLE trust_user LOGIN;"
        "SET password_encryption = 'md5';"
        f"CREATE ROLE md5_user LOGIN PASSWORD '{PASSWORDS['md5_user']}';",
        dbname="postgres",
    )
    cluster.psql(f"CREATE DATABASE {APP_DB} OWNER app_owner", dbname="postgres")
    cluster.psql(
        "GRANT ALL ON SCHEMA public TO app_owner, md5_user, trust_user; "
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"
    )


def _adopt(dsn: str) -> PgCluster:
    from urllib.parse import urlparse

    u = urlparse(dsn)
    cluster = PgCluster(u.hostname or "127.0.0.1", u.port or 5432, None, False)
    if u.password:
        PASSWORDS["postgres"] = u.password
    with contextlib.suppress(RuntimeError):
        _bootstrap(cluster)
    return cluster
