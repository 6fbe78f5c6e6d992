"""The shop database of the example policies, and guardproxy in front of it, for the policy tests.

Import it from a test module (``import shop``) and bring the fixtures into the
module's namespace by assignment, ``shop_db = shop.shop_db``, so pytest finds them.

* ``shop_db`` (session): a dedicated database ``shop`` owned by ``app_owner`` with
  ``sql/example_schema.sql`` loaded as ``app_owner``, the roles and grants of
  ``guardproxy roles`` (as computed by ``roles_sql``) applied as superuser, and the
  agent types' roles granted to ``app_owner`` (the proxy logs in as ``app_owner``
  and sets ``role`` per agent type), plus guardproxy's own schema (``guardproxy db
  upgrade``). Its own database keeps other tests' tables out of the catalog the
  proxy reads. ``shop_baseline`` (session): its snapshot right after loading.
* `snapshot(pg)`: everything an attack could change, read as superuser in one
  call: the rows of the four tables, sequence positions, grants, and the objects
  that can be planted (relations, functions, rules, triggers, large objects,
  schemas, per-role settings, roles). Equal snapshots before and after = no effect.
* `restore_shop(pg)`: back to the freshly loaded state, whatever happened;
  ``clean_shop``: a fixture that does it after a test that changed anything.
* `ShopProxy` / `launch_proxy`: ``guardproxy serve`` as a subprocess in front of
  ``shop`` with the example policies (or others), for module-scoped fixtures.
* `RawAgent`: a tiny synchronous PostgreSQL v3 client that keeps every byte the
  proxy sent, so a test can prove a secret appears nowhere in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgcluster import PgCluster, free_port, wait_for_port

from guardproxy.policy import Catalog, load_policy_set
from guardproxy.policy.tools import roles_sql

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"
SCHEMA_FILE = ROOT / "sql" / "example_schema.sql"
SHOP_DB = "shop"
AGENT_ROLES = ("guard_analytics", "guard_support", "guard_fulfillment")
TABLES = ("customers", "orders", "order_state_log", "payments")
# Agent ids of each example type (any id matching the policy's pattern works).
ANALYTICS, SUPPORT, FULFILLMENT = "analytics-1", "support-1", "fulfillment-1"
AGENT_OF = {"analytics": ANALYTICS, "support": SUPPORT, "fulfillment": FULFILLMENT}

# Values a denied statement must never bring back to the client: every customer's
# email and every payment's card_last4 and amount of the sample data.
SECRETS = (
    "ada@example.com",
    "grace@example.com",
    "edsger@example.com",
    "barbara@example.com",
    "4242",
    "1881",
    "129.90",
    "240.00",
)

IO_TIMEOUT = 10.0


# ---------------------------------------------------------------- the database


def schema_sql() -> str:
    return SCHEMA_FILE.read_text()


def roles_script() -> str:
    return roles_sql(load_policy_set(POLICIES), Catalog.from_ddl(schema_sql()))


def _load_schema(pg: PgCluster) -> None:
    """Tables and sample data as app_owner, then the roles and grants of the policies
    (after guardproxy's schema exists: soft deletes need grants there too)."""
    pg.psql(schema_sql(), user="app_owner", dbname=SHOP_DB)
    pg.psql(roles_script(), dbname=SHOP_DB)
    pg.psql(f"GRANT {', '.join(AGENT_ROLES)} TO app_owner", dbname=SHOP_DB)


def _upgrade_guardproxy_schema(pg: PgCluster) -> None:
    """guardproxy's own schema (audit log, ledgers): the proxy refuses to start without it."""
    out = subprocess.run(
        [sys.executable, "-m", "guardproxy", "db", "upgrade", "--upstream", pg.dsn(dbname=SHOP_DB)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, f"guardproxy db upgrade failed:\n{out.stdout}\n{out.stderr}"


@pytest.fixture(scope="session")
def shop_db(pg: PgCluster) -> PgCluster:
    """The shop database, loaded once per session (see the module docstring)."""
    pg.psql(f"DROP DATABASE IF EXISTS {SHOP_DB} WITH (FORCE)", dbname="postgres")
    pg.psql(f"CREATE DATABASE {SHOP_DB} OWNER app_owner", dbname="postgres")
    pg.psql("GRANT ALL ON SCHEMA public TO app_owner", dbname=SHOP_DB)
    _upgrade_guardproxy_schema(pg)
    _load_schema(pg)
    return pg


_SNAPSHOT_SQL = """
SELECT json_build_object(
  'customers', (SELECT json_agg(t ORDER BY t.id) FROM customers t),
  'orders', (SELECT json_agg(t ORDER BY t.id) FROM orders t),
  'order_state_log', (SELECT json_agg(t ORDER BY t.id) FROM order_state_log t),
  'payments', (SELECT json_agg(t ORDER BY t.id) FROM payments t),
  'sequences', (SELECT json_agg(json_build_array(sequencename, last_value) ORDER BY sequencename)
                FROM pg_sequences WHERE schemaname = 'public'),
  'relations', (SELECT json_agg(n.nspname || '.' || c.relname || ':' || c.relkind::text ORDER BY 1)
                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
                  AND n.nspname NOT LIKE 'pg_temp%' AND n.nspname NOT LIKE 'pg_toast_temp%'),
  'functions', (SELECT json_agg(p.oid::regprocedure::text ORDER BY 1) FROM pg_proc p
                JOIN pg_namespace n ON n.oid = p.pronamespace
                WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')),
  'rules', (SELECT json_agg(schemaname || '.' || tablename || '.' || rulename ORDER BY 1)
            FROM pg_rules WHERE schemaname <> 'pg_catalog'),
  'triggers', (SELECT json_agg(tgrelid::regclass::text || '.' || tgname ORDER BY 1)
               FROM pg_trigger WHERE NOT tgisinternal),
  'event_triggers', (SELECT json_agg(evtname ORDER BY 1) FROM pg_event_trigger),
  'large_objects', (SELECT count(*) FROM pg_largeobject_metadata),
  'schemas', (SELECT json_agg(nspname ORDER BY 1) FROM pg_namespace
              WHERE nspname NOT LIKE 'pg_temp%' AND nspname NOT LIKE 'pg_toast_temp%'),
  'table_acl', (SELECT json_agg(c.relname || ':' || coalesce(c.relacl::text, '')) FROM pg_class c
                WHERE c.relnamespace = 'public'::regnamespace),
  'column_acl', (SELECT json_agg(c.relname || '.' || a.attname || ':' || a.attacl::text)
                 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                 WHERE c.relnamespace = 'public'::regnamespace AND a.attacl IS NOT NULL),
  'role_settings', (SELECT json_agg(json_build_array(setrole::regrole::text, setdatabase, setconfig)
                    ORDER BY 1) FROM pg_db_role_setting),
  'roles', (SELECT json_agg(rolname || ':' || rolsuper::text || rolcreaterole::text || rolcreatedb::text ORDER BY 1)
            FROM pg_roles WHERE rolname NOT LIKE 'pg\\_%')
)
"""


def snapshot(pg: PgCluster) -> dict[str, Any]:
    """Rows and plantable objects of the shop database, read as superuser."""
    state = json.loads(pg.psql(_SNAPSHOT_SQL, dbname=SHOP_DB))
    for key, value in state.items():
        if key not in TABLES and isinstance(value, list):
            state[key] = sorted(value, key=json.dumps)  # catalog order is not stable
    return state


def table_rows(pg: PgCluster, table: str) -> list[dict[str, Any]]:
    rows = snapshot(pg)[table]
    return list(rows or [])


_WIPE_SQL = r"""
DO $wipe$ DECLARE r record; BEGIN
  FOR r IN SELECT evtname FROM pg_event_trigger LOOP
    EXECUTE format('DROP EVENT TRIGGER %I', r.evtname);
  END LOOP;
  FOR r IN SELECT n.nspname FROM pg_namespace n
           WHERE n.nspname NOT IN ('public', 'guardproxy', 'pg_catalog', 'information_schema',
                                   'pg_toast')
             AND n.nspname NOT LIKE 'pg\_%' LOOP
    EXECUTE format('DROP SCHEMA %I CASCADE', r.nspname);
  END LOOP;
  FOR r IN SELECT c.oid::regclass AS name, c.relkind FROM pg_class c
           WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('v', 'm') LOOP
    EXECUTE format('DROP %s IF EXISTS %s CASCADE',
                   CASE r.relkind WHEN 'v' THEN 'VIEW' ELSE 'MATERIALIZED VIEW' END, r.name);
  END LOOP;
  FOR r IN SELECT c.oid::regclass AS name FROM pg_class c
           WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'f') LOOP
    EXECUTE format('DROP TABLE IF EXISTS %s CASCADE', r.name);
  END LOOP;
  FOR r IN SELECT c.oid::regclass AS name FROM pg_class c
           WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'S' LOOP
    EXECUTE format('DROP SEQUENCE IF EXISTS %s CASCADE', r.name);
  END LOOP;
  FOR r IN SELECT p.oid::regprocedure AS sig, p.prokind FROM pg_proc p
           WHERE p.pronamespace = 'public'::regnamespace LOOP
    EXECUTE format('DROP %s IF EXISTS %s CASCADE',
                   CASE r.prokind WHEN 'p' THEN 'PROCEDURE' WHEN 'a' THEN 'AGGREGATE'
                                  ELSE 'FUNCTION' END, r.sig);
  END LOOP;
  PERFORM lo_unlink(oid) FROM pg_largeobject_metadata;
END $wipe$;
"""


def restore_shop(pg: PgCluster) -> None:
    """The shop database as freshly loaded (drops whatever was planted, reloads the data)."""
    pg.psql(_WIPE_SQL, dbname=SHOP_DB)
    for role in AGENT_ROLES:
        pg.psql(f"ALTER ROLE {role} IN DATABASE {SHOP_DB} RESET ALL", dbname=SHOP_DB)
    _load_schema(pg)


@pytest.fixture(scope="session")
def shop_baseline(shop_db: PgCluster) -> dict[str, Any]:
    return snapshot(shop_db)


@pytest.fixture
def clean_shop(shop_db: PgCluster, shop_baseline: dict[str, Any]) -> Iterator[PgCluster]:
    """For tests that change the shop: restores it afterwards if anything changed."""
    yield shop_db
    if snapshot(shop_db) != shop_baseline:
        restore_shop(shop_db)


# ---------------------------------------------------------------- the proxy


@dataclass
class ShopProxy:
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)

    def dsn(self, agent: str) -> str:
        """A URL any client takes (libpq, asyncpg, SQLAlchemy); bound waits in the client."""
        return f"postgresql://{agent}@127.0.0.1:{self.port}/{SHOP_DB}"

    def connect(self, agent: str, **kwargs: Any) -> psycopg.Connection[Any]:
        """psycopg connection of ``agent`` (connect bounded by IO_TIMEOUT)."""
        return psycopg.connect(self.dsn(agent), connect_timeout=int(IO_TIMEOUT), **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, pattern: str, after: int = 0, timeout: float = 15.0) -> str:
        """The first log line at or after byte ``after`` matching ``pattern`` (bounded wait)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log()[after:].splitlines():
                if regex.search(line):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no log line matching {pattern!r} within {timeout}s:\n{self.log()[after:][-4000:]}"
                )
            if self.proc.poll() is not None:
                raise AssertionError(f"guardproxy exited ({self.proc.returncode}):\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.contextmanager
def launch_proxy(
    pg: PgCluster, log_path: Path, policies: Path | None = POLICIES, **settings: Any
) -> Iterator[ShopProxy]:
    """``guardproxy serve`` in front of the shop database with ``policies`` (None: pooling
    only); stopped on exit."""
    port = free_port()
    merged = {"pool_size": 5, "log_level": "info", "pool_acquire_timeout": 10, **settings}
    args = [
        "serve",
        "--upstream",
        pg.dsn(dbname=SHOP_DB),
        "--listen-port",
        str(port),
    ]
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
    handle = ShopProxy(port, proc, log_path, args)
    try:
        try:
            wait_for_port("127.0.0.1", port, timeout=20)
        except TimeoutError:
            raise RuntimeError(f"guardproxy did not start:\n{handle.log()}") from None
        if policies is not None:  # judge with the upstream catalog from the first statement on
            handle.wait_for_log(r"catalog loaded")
        yield handle
    finally:
        handle.stop()


def dump_log_on_failure(request: pytest.FixtureRequest, proxy: ShopProxy, since: int) -> None:
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(
            f"\n----- guardproxy log ({' '.join(proxy.args)}) -----\n{proxy.log()[since:][-6000:]}"
        )


# ---------------------------------------------------------------- a raw client


@dataclass
class Reply:
    """What came back for one simple Query, up to and including ReadyForQuery."""

    raw: bytes = b""
    errors: list[dict[str, str]] = field(default_factory=list)
    rows: list[list[str | None]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    notices: list[dict[str, str]] = field(default_factory=list)
    status: str = ""

    @property
    def error(self) -> dict[str, str]:
        assert self.errors, f"expected an error, got rows {self.rows} tags {self.tags}"
        return self.errors[0]

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", errors="replace")


def _fields(body: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        end = body.index(b"\x00", pos + 1)
        out[code] = body[pos + 1 : end].decode("utf-8", errors="replace")
        pos = end + 1
    return out


def _cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


class RawAgent:
    """One agent connection speaking the v3 protocol by hand (simple Query only)."""

    def __init__(self, port: int, agent: str, dbname: str = SHOP_DB, **params: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        self.sock.settimeout(IO_TIMEOUT)
        body = b"".join(
            _cstr(k) + _cstr(v) for k, v in {"user": agent, "database": dbname, **params}.items()
        )
        body += b"\x00"
        self.sock.sendall(struct.pack("!ii", 8 + len(body), 3 << 16) + body)
        self.login = self._read_until_ready()

    def __enter__(self) -> RawAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv_exact(self, size: int) -> bytes:
        chunks = b""
        while len(chunks) < size:
            chunk = self.sock.recv(size - len(chunks))
            if not chunk:
                raise ConnectionError(f"the proxy closed the connection; got {chunks!r}")
            chunks += chunk
        return chunks

    def _read_until_ready(self) -> Reply:
        reply = Reply()
        while True:
            try:
                header = self._recv_exact(5)
            except ConnectionError:
                if reply.errors:
                    return reply  # a FATAL error and the connection closed
                raise
            kind = header[:1]
            (length,) = struct.unpack("!i", header[1:])
            body = self._recv_exact(length - 4)
            reply.raw += header + body
            if kind == b"E":
                reply.errors.append(_fields(body))
            elif kind == b"N":
                reply.notices.append(_fields(body))
            elif kind == b"C":
                reply.tags.append(body.rstrip(b"\x00").decode())
            elif kind == b"D":
                (count,) = struct.unpack_from("!h", body, 0)
                pos, row = 2, []
                for _ in range(count):
                    (size,) = struct.unpack_from("!i", body, pos)
                    pos += 4
                    if size < 0:
                        row.append(None)
                    else:
                        row.append(body[pos : pos + size].decode("utf-8", errors="replace"))
                        pos += size
                reply.rows.append(row)
            elif kind == b"Z":
                reply.status = body.decode()
                return reply

    def query(self, sql: str) -> Reply:
        payload = _cstr(sql)
        self.sock.sendall(b"Q" + struct.pack("!i", 4 + len(payload)) + payload)
        return self._read_until_ready()

    def send(self, kind: bytes, payload: bytes) -> Reply:
        """Any message; what came back up to ReadyForQuery, or until the proxy hung up."""
        self.sock.sendall(kind + struct.pack("!i", 4 + len(payload)) + payload)
        try:
            return self._read_until_ready()
        except ConnectionError:
            return Reply(status="closed")

    def scalar(self, sql: str) -> str | None:
        reply = self.query(sql)
        assert not reply.errors, reply.errors
        return reply.rows[0][0]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"X\x00\x00\x00\x04")
        self.sock.close()


# ---------------------------------------------------------------- assertions


def assert_names(message: str, agent_type: str, rule: str, obj: str) -> None:
    """The denial names the agent type, the rule (``(policy T, rule...)``) and the object."""
    assert agent_type in message, f"agent type {agent_type!r} not named in: {message}"
    assert f"(policy {agent_type}, {rule}" in message, f"rule {rule!r} not named in: {message}"
    assert obj.lower() in message.lower(), f"object {obj!r} not named in: {message}"


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"secret {secret!r} reached the client: {text[:2000]!r}"
