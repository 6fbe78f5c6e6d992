"""`guardproxy db upgrade|downgrade|current`: alembic, driven from code (no alembic.ini)."""

from __future__ import annotations

import io
from importlib.resources import files

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from guardproxy.store.models import SCHEMA


def sqlalchemy_url(dsn: str) -> str:
    """A postgresql:// DSN as SQLAlchemy wants it (psycopg 3 driver)."""
    for prefix in ("postgresql://", "postgres://"):
        if dsn.startswith(prefix):
            return "postgresql+psycopg://" + dsn[len(prefix) :]
    return dsn


def alembic_config(dsn: str, out: io.StringIO | None = None) -> Config:
    cfg = Config(stdout=out) if out is not None else Config()
    cfg.set_main_option("script_location", str(files("guardproxy.migrations")))
    # configparser interpolation: a % in a password must be doubled
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(dsn).replace("%", "%%"))
    return cfg


def upgrade(dsn: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(dsn), revision)


def downgrade(dsn: str, revision: str) -> None:
    command.downgrade(alembic_config(dsn), revision)


def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config("postgresql://x@localhost/x"))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(dsn: str) -> str | None:
    engine = create_engine(sqlalchemy_url(dsn))
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version", schema=SCHEMA):
                return None
            context = MigrationContext.configure(conn, opts={"version_table_schema": SCHEMA})
            return context.get_current_revision()
    finally:
        engine.dispose()
