"""`guardproxy db upgrade|downgrade|current` against the real Postgres."""

from __future__ import annotations

import subprocess
import sys

from pgcluster import PgCluster


def gp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guardproxy", *args], capture_output=True, text=True, timeout=60
    )


def test_upgrade_creates_schema_downgrade_removes_it_current_tells_which(pg: PgCluster) -> None:
    pg.psql("CREATE DATABASE schema_test OWNER app_owner", dbname="postgres")
    dsn = pg.dsn(dbname="schema_test")
    try:
        before = gp("db", "current", "--upstream", dsn)
        assert (
            before.returncode == 1
            and "none" in before.stdout
            and "guardproxy db upgrade" in before.stdout
        )

        up = gp("db", "upgrade", "--upstream", dsn)
        assert up.returncode == 0, up.stderr
        tables = pg.psql(
            "select string_agg(tablename, ',' order by tablename) from pg_tables where schemaname = 'guardproxy'",
            dbname="schema_test",
        )
        assert tables == "alembic_version,audit_events,deleted_rows,idempotency_keys,task_budgets"
        assert (
            pg.psql(
                "select count(*) from pg_proc where proname = 'refuse_soft_deleted'",
                dbname="schema_test",
            )
            == "1"
        )
        now = gp("db", "current", "--upstream", dsn)
        assert now.returncode == 0 and "up to date" in now.stdout

        down = gp("db", "downgrade", "base", "--upstream", dsn)
        assert down.returncode == 0, down.stderr
        left = pg.psql(
            "select count(*) from pg_tables where schemaname = 'guardproxy' and tablename <> 'alembic_version'",
            dbname="schema_test",
        )
        assert left == "0"
    finally:
        pg.psql("DROP DATABASE schema_test WITH (FORCE)", dbname="postgres")
