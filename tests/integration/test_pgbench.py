"""pgbench through the proxy: 50 clients over 5 server connections, all three protocols.

Each run must finish every transaction with none failed, and the proxy must
never hold more than ``pool_size`` connections to Postgres: a sampler counts
the backends of the upstream role that started after the proxy did.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Iterator

import pytest
from pgcluster import PASSWORDS, PG_BINDIR

pytestmark = pytest.mark.timeout(120)

POOL_SIZE = 5
CLIENTS = 50
TX_PER_CLIENT = 20
TABLES = "pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history"


def pgbench(
    args: list[str], host: str, port: int, user: str, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PGCONNECT_TIMEOUT="10", PGPASSWORD=PASSWORDS.get(user, ""))
    return subprocess.run(
        [f"{PG_BINDIR}/pgbench", "-h", host, "-p", str(port), "-U", user, *args, "app"],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def pgbench_tables(pg) -> Iterator[None]:
    """pgbench's tables at scale 1, made straight on the server (the init test does it via the proxy)."""
    out = pgbench(["-i", "-q", "-s", "1"], pg.host, pg.port, "app_owner")
    assert out.returncode == 0, out.stderr
    yield
    pg.psql(f"DROP TABLE IF EXISTS {TABLES}")


class ServerCounter:
    """Samples how many backends of app_owner on app started since ``since``; keeps the max."""

    def __init__(self, pg, since: str) -> None:
        self.pg = pg
        self.query = (
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app_owner' AND datname = 'app' "
            f"AND backend_start >= '{since}'"
        )
        self.max = 0
        self.samples = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        n = int(self.pg.psql(self.query))
        self.max = max(self.max, n)
        self.samples += 1
        return n

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except BaseException as exc:
                self.error = exc
                return
            self._stop.wait(0.05)

    def __enter__(self) -> ServerCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)
        self.sample()


def started_proxy(start_proxy, pg):
    since = pg.psql("SELECT now()")
    return start_proxy(pool_size=POOL_SIZE), since


def assert_clean_run(out: subprocess.CompletedProcess[str], expected_tx: int) -> None:
    report = f"exit {out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr[-3000:]}"
    assert out.returncode == 0, report
    processed = re.search(r"number of transactions actually processed: (\d+)/(\d+)", out.stdout)
    assert processed is not None, report
    assert (int(processed[1]), int(processed[2])) == (expected_tx, expected_tx), report
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    assert failed is not None and int(failed[1]) == 0, report
    assert "error" not in out.stderr.lower(), report


def test_pgbench_init_through_proxy(start_proxy, pg, pgbench_tables) -> None:
    proxy, since = started_proxy(start_proxy, pg)
    with ServerCounter(pg, since) as counter:
        out = pgbench(["-i", "-q", "-s", "1"], "127.0.0.1", proxy.port, "pgbench-init")
    assert out.returncode == 0, out.stderr
    assert "done in" in out.stderr
    assert pg.psql("SELECT count(*) FROM pgbench_accounts") == "100000"
    assert pg.psql("SELECT count(*), sum(bbalance) FROM pgbench_branches") == "1|0"
    assert pg.psql("SELECT count(*) FROM pgbench_tellers") == "10"
    assert pg.psql("SELECT count(*) FROM pgbench_history") == "0"
    # primary keys were added (the last init step)
    assert (
        pg.psql("SELECT count(*) FROM pg_indexes WHERE indexname = 'pgbench_accounts_pkey'") == "1"
    )
    assert counter.error is None, counter.error
    assert 1 <= counter.max <= POOL_SIZE, counter.max


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
@pytest.mark.parametrize("select_only", [False, True], ids=["tpcb", "select-only"])
def test_pgbench_50_clients_over_5_servers(
    start_proxy, pg, pgbench_tables, mode: str, select_only: bool
) -> None:
    history_before = int(pg.psql("SELECT count(*) FROM pgbench_history"))
    proxy, since = started_proxy(start_proxy, pg)
    # -n: no vacuum/truncate of history before the run, so history counts every transaction
    args = ["-n", "-M", mode, "-c", str(CLIENTS), "-j", "2", "-t", str(TX_PER_CLIENT)]
    if select_only:
        args.append("-S")
    with ServerCounter(pg, since) as counter:
        out = pgbench(args, "127.0.0.1", proxy.port, f"pgbench-{mode}")
    assert_clean_run(out, CLIENTS * TX_PER_CLIENT)
    assert f"query mode: {mode}" in out.stdout
    assert f"number of clients: {CLIENTS}" in out.stdout

    history_after = int(pg.psql("SELECT count(*) FROM pgbench_history"))
    if select_only:
        assert history_after == history_before
    else:
        # every TPC-B transaction inserted one history row and moved balances consistently
        assert history_after - history_before == CLIENTS * TX_PER_CLIENT
        sums = pg.psql(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(bbalance) FROM pgbench_branches), "
            "(SELECT sum(tbalance) FROM pgbench_tellers), (SELECT sum(delta) FROM pgbench_history)"
        ).split("|")
        assert len(set(sums)) == 1, sums

    assert counter.error is None, counter.error
    assert counter.samples >= 2
    assert 1 <= counter.max <= POOL_SIZE, f"the proxy opened {counter.max} server connections"
