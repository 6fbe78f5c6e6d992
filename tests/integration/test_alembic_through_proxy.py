"""An alembic upgrade/downgrade through the proxy, from a migration directory made here.

The effects (tables, columns, rows, the version table) are checked on the
real server with ``pg.psql``.
"""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config

pytestmark = pytest.mark.timeout(90)

ENV_PY = """\
from alembic import context
from sqlalchemy import create_engine

config = context.config
engine = create_engine(config.get_main_option("sqlalchemy.url"), connect_args={"connect_timeout": 10})
try:
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=None,
            version_table=config.get_main_option("version_table"),
        )
        with context.begin_transaction():
            context.run_migrations()
finally:
    engine.dispose()
"""

REV_1 = """\
import sqlalchemy as sa
from alembic import op

revision = "a1"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    t = op.create_table(
        "{table}",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(40), nullable=False),
    )
    op.create_index("{table}_name", "{table}", ["name"], unique=True)
    op.bulk_insert(t, [{{"id": i, "name": f"n{{i}}"}} for i in range(1, 6)])


def downgrade():
    op.drop_index("{table}_name", table_name="{table}")
    op.drop_table("{table}")
"""

REV_2 = """\
import sqlalchemy as sa
from alembic import op

revision = "b2"
down_revision = "a1"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("{table}", sa.Column("score", sa.Integer, nullable=True))
    op.execute("UPDATE {table} SET score = id * 10")
    op.alter_column("{table}", "score", nullable=False)


def downgrade():
    op.drop_column("{table}", "score")
"""

REV_3_FAILS = """\
import sqlalchemy as sa
from alembic import op

revision = "c3"
down_revision = "b2"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("{table}_extra", sa.Column("id", sa.Integer, primary_key=True))
    op.execute("UPDATE {table} SET score = score / 0")


def downgrade():
    op.drop_table("{table}_extra")
"""


def write_scripts(root: Path, table: str) -> Path:
    scripts = root / "migrations"
    (scripts / "versions").mkdir(parents=True)
    (scripts / "env.py").write_text(ENV_PY)
    (scripts / "script.py.mako").write_text("")
    (scripts / "versions" / "a1_create.py").write_text(REV_1.format(table=table))
    (scripts / "versions" / "b2_score.py").write_text(REV_2.format(table=table))
    return scripts


def test_alembic_upgrade_and_downgrade_through_proxy(proxy, pg, tmp_path: Path) -> None:
    table = f"alembic_{uuid.uuid4().hex[:8]}"
    version_table = f"{table}_version"
    scripts = write_scripts(tmp_path, table)
    cfg = Config()
    cfg.set_main_option("script_location", str(scripts))
    cfg.set_main_option(
        "sqlalchemy.url",
        proxy.dsn("alembic-agent").replace("postgresql://", "postgresql+psycopg://"),
    )
    cfg.set_main_option("version_table", version_table)

    def version() -> str:
        return pg.psql(f"SELECT coalesce(string_agg(version_num, ','), '') FROM {version_table}")

    def columns() -> str:
        return pg.psql(
            "SELECT coalesce(string_agg(column_name, ',' ORDER BY ordinal_position), '') "
            f"FROM information_schema.columns WHERE table_name = '{table}'"
        )

    try:
        command.upgrade(cfg, "a1")
        assert version() == "a1"
        assert columns() == "id,name"
        assert pg.psql(f"SELECT string_agg(name, ',' ORDER BY id) FROM {table}") == "n1,n2,n3,n4,n5"
        assert pg.psql(f"SELECT count(*) FROM pg_indexes WHERE indexname = '{table}_name'") == "1"

        command.upgrade(cfg, "head")
        assert version() == "b2"
        assert columns() == "id,name,score"
        assert (
            pg.psql(f"SELECT string_agg(score::text, ',' ORDER BY id) FROM {table}")
            == "10,20,30,40,50"
        )

        # a migration that fails half way: Postgres's transactional DDL undoes all of it
        (scripts / "versions" / "c3_fails.py").write_text(
            textwrap.dedent(REV_3_FAILS.format(table=table))
        )
        with pytest.raises(Exception, match="division by zero"):
            command.upgrade(cfg, "head")
        assert version() == "b2"
        assert pg.psql(f"SELECT count(*) FROM pg_tables WHERE tablename = '{table}_extra'") == "0"
        assert (
            pg.psql(f"SELECT string_agg(score::text, ',' ORDER BY id) FROM {table}")
            == "10,20,30,40,50"
        )
        (scripts / "versions" / "c3_fails.py").unlink()

        command.downgrade(cfg, "-1")
        assert version() == "a1"
        assert columns() == "id,name"

        command.downgrade(cfg, "base")
        assert version() == ""
        assert columns() == ""
        assert pg.psql(f"SELECT count(*) FROM pg_tables WHERE tablename = '{table}'") == "0"

        # and up again in one go
        command.upgrade(cfg, "head")
        assert version() == "b2"
        assert pg.psql(f"SELECT count(*), sum(score) FROM {table}") == "5|150"
    finally:
        pg.psql(f"DROP TABLE IF EXISTS {table}_extra, {table}, {version_table}")
