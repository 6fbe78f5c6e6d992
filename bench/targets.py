"""The three things measured: direct Postgres, PgBouncer and guardproxy.

Each ``start_*`` function returns a :class:`Target`. A target that cannot be
started is returned with ``skip`` set to the reason, so the run goes on with
the others; only a broken direct Postgres stops the harness. Proxies listen
on a free loopback port, pool in transaction mode with the same pool size,
and let clients in without a password (``trust``), so client authentication
costs the same (nothing) everywhere; both log in upstream with SCRAM as
``app_owner``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Processes, wait_listening

UPSTREAM_USER = "app_owner"
UPSTREAM_PASSWORD = "app_pw"
UPSTREAM_DB = "app"


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen[bytes] | None = None  # the proxy whose CPU is measured; None for direct
    log: Path | None = None  # the proxy's stdout and stderr
    skip: str | None = None  # why this target is not measured (any more)
    note: str | None = None  # a caveat printed under the table
    reconnect_before_prepared: bool = False  # PgBouncer < 1.21: RECONNECT before -M prepared

    def check_alive(self) -> None:
        """Mark the target skipped from now on if its process has exited."""
        if self.proc is not None and self.skip is None and self.proc.poll() is not None:
            self.skip = f"exited during the run with code {self.proc.returncode}; see {self.log}"


@dataclass(frozen=True)
class Launch:
    """What every proxy is started with."""

    pg_port: int  # upstream Postgres, on 127.0.0.1
    port: int  # where the proxy listens, on 127.0.0.1
    pool_size: int  # server connections
    log: Path  # the proxy's stdout and stderr
    cwd: Path | None = None  # working directory (relative paths in extra flags resolve here)


def as_root() -> bool:
    return os.geteuid() == 0


def direct(port: int) -> Target:
    return Target("direct", port)


# --- PgBouncer -----------------------------------------------------------------------


def find_pgbouncer() -> str | None:
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")


def pgbouncer_binary() -> str:
    """Path to pgbouncer, installing Debian's package first when it is missing."""
    if found := find_pgbouncer():
        return found
    if not as_root():
        raise RuntimeError("pgbouncer is not installed; run: sudo apt-get install -y pgbouncer")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "pgbouncer"]):
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    found = find_pgbouncer()
    if not found:
        raise RuntimeError("apt-get installed pgbouncer but no pgbouncer binary was found")
    return found


def pgbouncer_version(binary: str) -> tuple[int, int]:
    first = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False
    ).stdout
    numbers = first.split()[1].split(".") if first.startswith("PgBouncer ") else ["0", "0"]
    return int(numbers[0]), int(numbers[1])


def pgbouncer_ini(
    pg_port: int, port: int, workdir: Path, pool_size: int, version: tuple[int, int]
) -> str:
    lines = [
        "[databases]",
        f"{UPSTREAM_DB} = host=127.0.0.1 port={pg_port} dbname={UPSTREAM_DB}",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = trust",
        f"auth_file = {workdir / 'userlist.txt'}",
        "pool_mode = transaction",
        f"default_pool_size = {pool_size}",
        "min_pool_size = 0",
        "reserve_pool_size = 0",
        "max_client_conn = 2000",
        "log_connections = 0",
        "log_disconnections = 0",
        "ignore_startup_parameters = extra_float_digits",
        f"admin_users = {UPSTREAM_USER}",  # for RECONNECT through the admin console
    ]
    if version >= (1, 21):  # protocol-level prepared statements in transaction mode
        lines.append("max_prepared_statements = 200")
    return "\n".join(lines) + "\n"


def start_pgbouncer(processes: Processes, launch: Launch, binary: str, workdir: Path) -> Target:
    workdir.mkdir(mode=0o755, exist_ok=True)
    ini = workdir / "pgbouncer.ini"
    version = pgbouncer_version(binary)
    ini.write_text(pgbouncer_ini(launch.pg_port, launch.port, workdir, launch.pool_size, version))
    (workdir / "userlist.txt").write_text(f'"{UPSTREAM_USER}" "{UPSTREAM_PASSWORD}"\n')
    if as_root():  # pgbouncer refuses to run as root; -u drops to postgres, who must read these
        for path in (workdir, ini, workdir / "userlist.txt"):
            shutil.chown(path, "postgres", "postgres")
    cmd = [binary, *(["-u", "postgres"] if as_root() else []), str(ini)]
    target = _spawn_proxy("pgbouncer", processes, cmd, launch)
    if version < (1, 21):
        target.reconnect_before_prepared = True
        target.note = PREPARED_CAVEAT.format(version=".".join(map(str, version)))
    return target


PREPARED_CAVEAT = (
    "PgBouncer {version} does not carry protocol-level prepared statements across server "
    "connections in transaction mode (that needs 1.21+ and max_prepared_statements), so "
    '`-M prepared` with several clients fails with \'prepared statement "P_0" already '
    "exists'. Before each `-M prepared` run the harness RECONNECTs its server connections, "
    "so one client gets a clean server connection and its numbers are valid."
)


# --- guardproxy ----------------------------------------------------------------------


def guardproxy_missing(command: list[str], cwd: Path | None = None) -> str | None:
    """Why ``guardproxy serve`` cannot be used (yet), or None when it can."""
    if not shutil.which(command[0]):
        return f"{command[0]} does not exist (is guardproxy installed in the venv?)"
    try:
        out = subprocess.run(
            [*command, "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired:
        return "`guardproxy serve --help` did not answer within 60s"
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or [""]
        return f"`guardproxy serve --help` failed (exit {out.returncode}): {tail[0][:200]}"
    return None


def start_guardproxy(
    processes: Processes,
    launch: Launch,
    command: list[str],
    extra_args: list[str],
    name: str = "guardproxy",
    database: str = UPSTREAM_DB,
) -> Target:
    """Start ``COMMAND serve ...``; COMMAND is e.g. [".venv/bin/guardproxy"]."""
    if why := guardproxy_missing(command, launch.cwd):
        return Target(name, launch.port, skip=why)
    user = f"{UPSTREAM_USER}:{UPSTREAM_PASSWORD}"
    flags = {
        "--upstream": f"postgresql://{user}@127.0.0.1:{launch.pg_port}/{database}",
        "--listen-host": "127.0.0.1",
        "--listen-port": str(launch.port),
        "--auth-mode": "trust",
        "--pool-size": str(launch.pool_size),
    }
    cmd = [*command, "serve", *itertools.chain.from_iterable(flags.items()), *extra_args]
    return _spawn_proxy(name, processes, cmd, launch)


def _spawn_proxy(name: str, processes: Processes, cmd: list[str], launch: Launch) -> Target:
    proc = processes.spawn(cmd, launch.log, cwd=launch.cwd)
    why = _with_log(wait_listening(proc, launch.port), launch.log)
    return Target(name, launch.port, proc, launch.log, skip=why)


def _with_log(why: str | None, log: Path) -> str | None:
    if why is None:
        return None
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    tail = [text for line in lines if (text := line.strip(_BOX_DRAWING))][-3:]
    return why + ("; log: " + " | ".join(tail) if tail else "")


_BOX_DRAWING = " \t│╭╮╰╯─"  # rich draws error messages in boxes
