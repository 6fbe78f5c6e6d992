"""Reads the upstream catalog (tables, columns, search_path) for the CLI tools."""

from __future__ import annotations

import psycopg

from guardproxy.analysis.catalog import (
    CATALOG_QUERY,
    FOREIGN_KEYS_QUERY,
    SEARCH_PATH_QUERY,
    Catalog,
    ForeignKeyRow,
)


def read_catalog(dsn: str) -> Catalog:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        rows = conn.execute(CATALOG_QUERY).fetchall()
        path_row = conn.execute(SEARCH_PATH_QUERY).fetchone()
        keys: list[ForeignKeyRow] = [tuple(r) for r in conn.execute(FOREIGN_KEYS_QUERY)]
    path = list(path_row[0]) if path_row and path_row[0] else ["public"]
    return Catalog.from_rows((tuple(row) for row in rows), search_path=path, foreign_keys=keys)
