"""Alembic environment for guardproxy's own schema (run by `guardproxy db ...`)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine, create_engine, text

from guardproxy.store.models import SCHEMA, Base

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url, "guardproxy db: no database URL configured"


def run_migrations_online() -> None:
    engine = create_engine(url)
    try:
        _run(engine)
    finally:
        engine.dispose()  # no pooled connection left behind for the garbage collector


def _run(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
        connection.commit()
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            version_table="alembic_version",
            version_table_schema=SCHEMA,
            include_schemas=True,
        )
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
