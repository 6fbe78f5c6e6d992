"""`guardproxy db upgrade|downgrade|current` against the real Postgres."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pgcluster import PgCluster

from guardproxy.store.schema_version import SCHEMA_HEAD


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
        assert tables == (
            "alembic_version,audit_events,budget_usage,deleted_rows,idempotency_keys,"
            "proxy_instances,task_budgets,token_revocations"
        )
        assert (
            pg.psql(
                "select count(*) from pg_proc where proname = 'refuse_soft_deleted'",
                dbname="schema_test",
            )
            == "1"
        )
        # 0006: the check of soft-deleted parents
        assert (
            pg.psql(
                "select count(*) from pg_proc where proname = 'live_parent'", dbname="schema_test"
            )
            == "1"
        )
        now = gp("db", "current", "--upstream", dsn)
        assert now.returncode == 0 and "up to date" in now.stdout

        # 0003, the instance registry: down removes only it, up brings it back
        back = gp("db", "downgrade", "0002", "--upstream", dsn)
        assert back.returncode == 0, back.stderr
        assert (
            pg.psql("select to_regclass('guardproxy.proxy_instances')", dbname="schema_test") == ""
        )
        assert pg.psql("select to_regclass('guardproxy.task_budgets')", dbname="schema_test") != ""
        behind = gp("db", "current", "--upstream", dsn)
        assert behind.returncode == 1 and "0002" in behind.stdout and SCHEMA_HEAD in behind.stdout
        again = gp("db", "upgrade", "--upstream", dsn)
        assert again.returncode == 0, again.stderr
        pg.psql(
            "INSERT INTO guardproxy.proxy_instances (slot, address, owner) VALUES (1, 'a:1', 'o')",
            dbname="schema_test",
        )
        assert (
            pg.psql(
                "select slot || ' ' || (heartbeat_at > now() - interval '1 minute') "
                "from guardproxy.proxy_instances",
                dbname="schema_test",
            )
            == "1 true"
        )
        with pytest.raises(RuntimeError, match="proxy_instances_slot_range"):
            pg.psql(
                "INSERT INTO guardproxy.proxy_instances (slot, address, owner) VALUES (256, 'a:1', 'o')",
                dbname="schema_test",
            )

        down = gp("db", "downgrade", "base", "--upstream", dsn)
        assert down.returncode == 0, down.stderr
        left = pg.psql(
            "select count(*) from pg_tables where schemaname = 'guardproxy' and tablename <> 'alembic_version'",
            dbname="schema_test",
        )
        assert left == "0"
    finally:
        pg.psql("DROP DATABASE schema_test WITH (FORCE)", dbname="postgres")
