"""SIGTERM lets open transactions finish then closes; SIGHUP reloads with no client dropped."""

from __future__ import annotations

import signal
import socket
import time

import psycopg
import pytest
from conftest import wait_until


def test_sigterm_stops_accepting_lets_the_open_transaction_commit_then_exits(
    start_proxy, pg
) -> None:
    pg.psql("create table if not exists shutdown_t(x int); truncate shutdown_t", user="app_owner")
    proxy = start_proxy(shutdown_timeout=20)
    conn = psycopg.connect(proxy.dsn("agent-s"), connect_timeout=10)
    conn.execute("insert into shutdown_t values (1)")  # a transaction is open
    proxy.proc.send_signal(signal.SIGTERM)
    # no new connections once shutting down
    wait_until(lambda: _refused(proxy.port), 10, "the listener to close")
    assert proxy.alive()  # still waiting for our transaction
    conn.execute("insert into shutdown_t values (2)")
    conn.commit()
    conn.close()
    proxy.proc.wait(20)
    assert proxy.proc.returncode == 0
    assert (
        pg.psql("select string_agg(x::text, ',' order by x) from shutdown_t", user="app_owner")
        == "1,2"
    )
    pg.psql("drop table shutdown_t", user="app_owner")


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_sighup_reload_keeps_every_client_connected(start_proxy, tmp_path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "readers.yaml").write_text(
        "agents: ['reader-*']\nupstream_role: app_owner\nmode: enforce\nstatements: [read]\n"
        "tables:\n  pg_class_copy: {ops: [select]}\nfunctions: {default: allow}\n"
    )

    proxy = start_proxy(policies=policies)
    clients = [
        psycopg.connect(proxy.dsn(f"reader-{i}"), autocommit=True, connect_timeout=10)
        for i in range(5)
    ]
    try:
        for c in clients:
            assert c.execute("select 1").fetchone() == (1,)
        for _ in range(3):
            proxy.proc.send_signal(signal.SIGHUP)
            time.sleep(0.3)
            for c in clients:
                assert c.execute("select 2").fetchone() == (2,)
        assert "policies reloaded" in proxy.log()
    finally:
        for c in clients:
            c.close()
    assert proxy.alive()


@pytest.fixture(autouse=True)
def _schema(pg) -> None:
    """A proxy with policies needs guardproxy's own schema in the database."""
    from guardproxy.store import migrate

    migrate.upgrade(pg.dsn())
