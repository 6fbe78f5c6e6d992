"""Pure SQL analysis with pglast: parse, classify, and describe statements.

Public API:

* `analyze(sql, catalog=None) -> tuple[StatementInfo, ...]` (raises `SqlSyntaxError`)
* `shape(sql) -> str | None`: the decision-cache key (normalized text)
* `Catalog`: tables, columns and search path of the upstream database
* the value types of `model`: `StatementInfo`, `RelationAccess`, `FunctionRef`,
  `SettingChange`, `CopyInfo`, `StatementClass`, `Op`

No sockets, no database, no policy: see `guardproxy.policy` for judging.
"""

from __future__ import annotations

from .analyzer import AnalyzedStatement, SqlSyntaxError, analyze, analyze_tree, parse
from .catalog import CATALOG_QUERY, EMPTY_CATALOG, SEARCH_PATH_QUERY, SYSTEM_SCHEMAS, Catalog
from .model import (
    ALWAYS_ALLOWED_CLASSES,
    CopyInfo,
    FunctionRef,
    Op,
    RelationAccess,
    SettingChange,
    StatementClass,
    StatementInfo,
)
from .shape import shape

__all__ = [
    "ALWAYS_ALLOWED_CLASSES",
    "CATALOG_QUERY",
    "EMPTY_CATALOG",
    "SEARCH_PATH_QUERY",
    "SYSTEM_SCHEMAS",
    "AnalyzedStatement",
    "Catalog",
    "CopyInfo",
    "FunctionRef",
    "Op",
    "RelationAccess",
    "SettingChange",
    "SqlSyntaxError",
    "StatementClass",
    "StatementInfo",
    "analyze",
    "analyze_tree",
    "parse",
    "shape",
]
