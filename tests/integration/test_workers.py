"""--workers N: several processes share one port; a cancel reaches its session whichever worker gets it."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from pgcluster import free_port

from guardproxy.server.cancel import worker_of


@pytest.fixture
def two_workers(start_proxy):
    return start_proxy(workers=2, listen_port=free_port())


def test_connections_spread_over_both_worker_processes(two_workers, pg) -> None:
    # the second worker may still be starting when the first answers: a few bounded rounds
    workers: set[int] = set()
    for _ in range(10):
        conns = [psycopg.connect(two_workers.dsn(f"agent-{i}"), autocommit=True) for i in range(16)]
        try:
            for c in conns:
                assert c.execute("select 1").fetchone() == (1,)
            # the worker index is in the backend key the proxy hands out (see cancel.py)
            workers |= {worker_of(c.info.backend_pid) for c in conns}
        finally:
            for c in conns:
                c.close()
        if workers == {0, 1}:
            break
        time.sleep(0.3)
    assert workers == {0, 1}


def test_cancel_lands_on_any_worker_and_stops_only_its_query(two_workers) -> None:
    for attempt in range(6):  # cancel connections land on either worker: try both paths
        with psycopg.connect(two_workers.dsn(f"sleeper-{attempt}"), autocommit=True) as conn:
            timer = threading.Timer(0.3, conn.cancel)
            timer.start()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("select pg_sleep(20)")
            timer.join()
            assert conn.execute("select 2").fetchone() == (2,)  # the session goes on
