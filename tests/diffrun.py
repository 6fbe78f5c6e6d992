"""The differential harness: a schema of its own, three targets, and the comparison.

* The schema: two small tables (``items``, ``events``) in a database of their own,
  ``difftest``, put back to the same rows before every run of a script
  (``TRUNCATE`` + ``INSERT``, a few milliseconds).
* The targets, each reached on a fresh connection per script: Postgres directly
  (as ``app_owner``), guardproxy with pooling only, and guardproxy with a permissive
  policy (``PERMISSIVE_POLICY``: everything on the schema is allowed, so every
  statement is judged, tagged and sent as the judge's text, and every answer
  relayed through the policy path). Both proxies log in upstream as ``app_owner``.
* ``Differential.check(script)``: runs the script on each target from the same
  state, normalizes what came back (``DOCUMENTED_DIFFERENCES``, nothing else), and
  returns every difference: in the answers, message by message, in the rows left in
  the tables, and in the server the client gave back (``Target.probe``).

The comparison itself is in ``tests/diffcompare.py``. Used by
``tests/integration/test_differential.py`` (a few hundred scripts in CI) and
``bench/differential.py`` (the long run).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from diffbugs import classify
from diffcompare import (
    DOCUMENTED_DIFFERENCES,
    Difference,
    Normalized,
    compare,
    data_row,
    documented,
    fields_of,
    normalize,
)
from diffwire import (
    READ_TIMEOUT,
    Bind,
    Broken,
    Conn,
    Execute,
    Parse,
    Query,
    Script,
    Sync,
    Transcript,
    run_script,
)
from pgcluster import PASSWORDS, PgCluster, free_port, wait_for_port

from guardproxy.protocol import codec

ROOT = Path(__file__).resolve().parent.parent
DIFF_DB = "difftest"

SCHEMA_SQL = """
DROP TABLE IF EXISTS events, items;
CREATE TABLE items (
    id   int  PRIMARY KEY,
    name text NOT NULL,
    qty  int  NOT NULL CHECK (qty >= 0)
);
CREATE TABLE events (
    id      int  PRIMARY KEY,
    item_id int  NOT NULL REFERENCES items (id),
    kind    text NOT NULL
);
"""

RESET_SQL = """
TRUNCATE events, items;
INSERT INTO items VALUES (1, 'bolt', 5), (2, 'nut', 0), (3, 'gear', 12), (4, 'axle', 2),
                         (5, 'cog', 7);
INSERT INTO events VALUES (1, 1, 'made'), (2, 1, 'sold'), (3, 3, 'made');
"""

STATE_SQL = """
SELECT json_build_object(
  'items', (SELECT json_agg(t ORDER BY t.id) FROM items t),
  'events', (SELECT json_agg(t ORDER BY t.id) FROM events t))
"""

# Allows everything on the schema: the judge still parses, tags and relays each statement.
PERMISSIVE_POLICY = """\
# The differential tests' policy: every statement class, every operation on the schema,
# every function. Nothing is denied there, so any difference from Postgres is the relay's.
agents: ["diff-*"]
upstream_role: app_owner
mode: enforce
statements: [read, write, ddl, admin, code, notify]
tables:
  items: {ops: [select, insert, update, delete, truncate, references, ddl, maintain]}
  events: {ops: [select, insert, update, delete, truncate, references, ddl, maintain]}
  no_such_table: {ops: [select]}  # so that Postgres, not the policy, says it does not exist
  pg_catalog.pg_prepared_statements: {ops: [select]}  # the harness's probe reads it
functions:
  default: allow
  allow: ["*"]
require_where: false
allow_locking: true
"""

# ---------------------------------------------------------------- the proxy


@contextlib.contextmanager
def launch_proxy(
    upstream: str, log_path: Path, policies: Path | None = None, **settings: Any
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """``guardproxy serve`` in front of ``upstream`` (trust auth on loopback)."""
    port = free_port()
    merged = {
        "pool_size": 5,
        "log_level": "info",
        "pool_acquire_timeout": 10,
        "admin_users": "admin",
        **settings,
    }
    args = ["serve", "--upstream", upstream, "--listen-port", str(port)]
    if policies is not None:
        args += ["--policies", str(policies)]
    for key, value in merged.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "guardproxy", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
    try:
        wait_for_port("127.0.0.1", port, timeout=20)
        if policies is not None:  # judged with the upstream catalog from the first statement
            deadline = time.monotonic() + 20
            while "catalog loaded" not in log_path.read_text(errors="replace"):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(
                        f"guardproxy did not load its catalog:\n{log_path.read_text()}"
                    )
                time.sleep(0.05)
        yield port, proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ---------------------------------------------------------------- targets

# What the server a proxy lends next must look like, whatever the client before did:
# default settings, no prepared statement but the proxy's own, no portal, no LISTEN, no
# advisory lock, no temporary table. Read by the other client right after a script, on
# the server the script's client gave back last (the pool lends the most recent first).
PROBE_SQL = (
    "SELECT current_setting('DateStyle'), current_setting('TimeZone'),"
    " (SELECT count(*) FROM pg_prepared_statements WHERE name NOT LIKE 'gp\\_%'),"
    " (SELECT count(*) FROM pg_cursors),"
    " (SELECT count(*) FROM pg_listening_channels()),"
    " (SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory'),"
    " (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())"
)
NOISE_ROUND = (Parse("", "SELECT 'noise' AS noise"), Bind("", "", ()), Execute(""), Sync())
PROBE_CLEAN = ["ISO, MDY", "Etc/UTC", "0", "0", "0", "0", "0"]
PROBE_TIMEOUT = 1.0  # a server that answers the probe answers in milliseconds


class Target:
    """One place a script runs: how to connect, and the other client that steals servers."""

    def __init__(
        self,
        name: str,
        address: str | tuple[str, int],
        user: str,
        database: str,
        password: str,
        proxy: bool = False,
    ) -> None:
        self.name = name
        self.address = address
        self.user = user
        self.database = database
        self.password = password
        self.proxy = proxy  # a proxy: its admin console says when a client is gone
        self.noise: Conn | None = None
        self.console: Conn | None = None
        self.stolen = False

    def connect(self) -> tuple[Conn, list[tuple[bytes, bytes]]]:
        return Conn.open(self.address, self.user, self.database, self.password)

    # the harness actions of diffwire.Steal / Give
    def steal(self) -> None:
        if self.stolen:
            return
        if self.noise is None:
            self.noise, _ = Conn.open(
                self.address, self.user.replace("-1", "-noise"), self.database, self.password
            )
        self.noise.simple("BEGIN")  # holds the server it got until Give
        self.stolen = True

    def give(self) -> None:
        """The other client gives the server back, leaving an unnamed statement of its own
        there (as any client may): the script's client must never run it."""
        if self.stolen and self.noise is not None:
            self.noise.simple("COMMIT")
            self.noise.exchange(NOISE_ROUND)
        self.stolen = False

    def run(self, script: Script) -> tuple[Transcript, int]:
        """The script on a fresh connection; the transcript and the session's pid."""
        conn, login = self.connect()
        try:
            transcript = run_script(conn, script, self)
        finally:
            self.give()
            peer = ""
            if self.proxy:
                host, port = conn.sock.getsockname()[:2]
                peer = f"{host}:{port}"
            conn.close()
            if peer:
                self._gone(peer)
        transcript.login = login
        return transcript, conn.pid

    def _gone(self, peer: str) -> None:
        """Waits until the proxy has let the client go (and given back or closed its server),
        so that what comes next meets the pool as the client left it."""
        if self.console is None:
            self.console, _ = Conn.open(self.address, "admin", "guardproxy")
        deadline = time.monotonic() + READ_TIMEOUT
        while peer.encode() in b"".join(body for _, body in self.console.simple("SHOW CLIENTS")):
            if time.monotonic() > deadline:
                raise AssertionError(f"the proxy did not let {peer} go")
            time.sleep(0.001)

    def probe(self) -> str:
        """What is wrong with the server the script's client gave back last ("" if nothing).

        The probe's Query goes out with a Sync behind it: a server left ignoring everything
        up to a Sync answers only the Sync (unless the proxy first sent it settings to
        replay, which it ignores too: then the probe waits PROBE_TIMEOUT)."""
        if self.noise is None:
            self.noise, _ = Conn.open(
                self.address, self.user.replace("-1", "-noise"), self.database, self.password
            )
        noise = self.noise
        noise.sock.settimeout(PROBE_TIMEOUT)
        try:
            query = Query(PROBE_SQL)
            noise.walker.answers = []
            noise.send(query.raw() + codec.SYNC)
            noise.walker.step(0, query)
            msgs = noise.walker.answers[0].msgs
            skipped = [kind for kind, _ in msgs] == [b"Z"]  # only the Sync was answered
            if not skipped:
                noise.walker.step(1, Sync())  # the Sync's own ReadyForQuery
        except Broken as exc:
            skipped, msgs = True, [(b"!", str(exc).encode())]
        finally:
            if self.noise is not None:
                self.noise.sock.settimeout(READ_TIMEOUT)
        if skipped:
            # closing the connection makes the proxy close that server: the pool heals
            self.close()
            return "the next client's Query on the server got no answer"
        rows = [data_row(body) for kind, body in msgs if kind == b"D"]
        errors = [fields_of(body) for kind, body in msgs if kind == b"E"]
        if errors or rows != [PROBE_CLEAN]:
            return f"the next client found the server in this state: {rows or errors}"
        return ""

    def close(self) -> None:
        if self.noise is not None:
            self.noise.close()
            self.noise = None
        if self.console is not None:
            self.console.close()
            self.console = None


# ---------------------------------------------------------------- the harness


@dataclass
class Outcome:
    differences: list[Difference] = field(default_factory=list)  # unexplained: failures
    # (the name in DOCUMENTED_DIFFERENCES or diffbugs.KNOWN_BUGS, the difference)
    known: list[tuple[str, Difference]] = field(default_factory=list)
    transcripts: dict[str, Normalized] = field(default_factory=dict)


class Differential:
    """The same scripts on Postgres and on each proxy target, from the same state."""

    def __init__(self, pg: PgCluster, targets: list[Target]) -> None:
        self.pg = pg
        self.direct = direct_target(pg)
        self.targets = targets
        self.admin = psycopg.connect(pg.dsn(dbname=DIFF_DB), autocommit=True)
        self.admin.execute("SET lock_timeout = '10s'")
        self.scripts = 0

    def close(self) -> None:
        for target in [self.direct, *self.targets]:
            target.close()
        self.admin.close()

    def reset(self) -> None:
        self.admin.execute(RESET_SQL)

    def state(self) -> Any:
        row = self.admin.execute(STATE_SQL).fetchone()
        assert row is not None
        return row[0]

    def check(self, script: Script, known_bugs: bool = True) -> Outcome:
        """Runs ``script`` everywhere. Differences the documentation explains are set aside
        in ``known``; so are those of known bugs (diffbugs.py) unless ``known_bugs`` is
        False (a bug's own regression test wants to see it)."""
        self.scripts += 1
        outcome = Outcome()
        self.reset()
        transcript, pid = self.direct.run(script)
        expected = normalize(transcript, pid)
        expected_state = self.state()
        outcome.transcripts["postgres"] = expected
        for target in self.targets:
            self.reset()
            transcript, pid = target.run(script)
            got = normalize(transcript, pid)
            outcome.transcripts[target.name] = got
            found = compare(target.name, expected, got)
            state = self.state()
            if state != expected_state:
                found.append(
                    Difference(target.name, "rows after the script", expected_state, state)
                )
            problem = target.probe() if target.proxy else ""
            if problem:
                found.append(Difference(target.name, "pool", "", problem))
            for bug, diff in classify(found, script, expected, documented):
                if bug is None or (not known_bugs and bug not in DOCUMENTED_DIFFERENCES):
                    outcome.differences.append(diff)
                else:
                    outcome.known.append((bug, diff))
        return outcome


def direct_target(pg: PgCluster) -> Target:
    if pg.socket_dir:  # trust on the local socket: no SCRAM round trips per script
        address: str | tuple[str, int] = os.path.join(pg.socket_dir, f".s.PGSQL.{pg.port}")
        return Target("postgres", address, "app_owner", DIFF_DB, "")
    return Target("postgres", (pg.host, pg.port), "app_owner", DIFF_DB, PASSWORDS["app_owner"])


def proxy_target(name: str, port: int, user: str) -> Target:
    return Target(name, ("127.0.0.1", port), user, DIFF_DB, "", proxy=True)


def create_database(pg: PgCluster) -> None:
    """The difftest database with the schema, and guardproxy's own schema (for policies)."""
    from guardproxy.store import migrate

    pg.psql(f"DROP DATABASE IF EXISTS {DIFF_DB} WITH (FORCE)", dbname="postgres")
    pg.psql(f"CREATE DATABASE {DIFF_DB} OWNER app_owner", dbname="postgres")
    pg.psql("GRANT ALL ON SCHEMA public TO app_owner", dbname=DIFF_DB)
    pg.psql(SCHEMA_SQL, user="app_owner", dbname=DIFF_DB)
    migrate.upgrade(pg.dsn(dbname=DIFF_DB))


def write_policy(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "diff.yaml").write_text(PERMISSIVE_POLICY)
    return directory


def describe(outcome: Outcome) -> str:
    return "\n".join(str(d) for d in outcome.differences)


@contextlib.contextmanager
def differential(pg: PgCluster, workdir: Path, **settings: Any) -> Iterator[Differential]:
    """The difftest database, guardproxy with pooling only and with PERMISSIVE_POLICY in
    front of it, and the harness over both; everything stopped on exit."""
    create_database(pg)
    upstream = pg.dsn(dbname=DIFF_DB)
    policies = write_policy(workdir / "policies")
    with (
        launch_proxy(upstream, workdir / "pooling.log", **settings) as (pooling, _),
        launch_proxy(upstream, workdir / "policy.log", policies, **settings) as (policy, _),
    ):
        harness = Differential(
            pg,
            [proxy_target("pooling", pooling, "agent-1"), proxy_target("policy", policy, "diff-1")],
        )
        try:
            yield harness
        finally:
            harness.close()
    for log in ("pooling.log", "policy.log"):
        text = (workdir / log).read_text(errors="replace")
        assert "Traceback" not in text, f"guardproxy logged an unhandled exception:\n{text[-6000:]}"


__all__ = ["Broken", "Differential", "Target", "differential"]
