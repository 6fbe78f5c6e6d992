"""System catalogs no agent reads unless its policy names them explicitly.

Introspection must work (Text-to-SQL agents and the drivers themselves read
``pg_catalog`` and ``information_schema``), so reads of system relations are allowed
by default, except these: they hold password hashes and connection strings, the
server's authentication and configuration files, per-role settings, column
statistics (most common values and histograms are table *data*, a way around
``deny_columns``), large object contents, and the text of other sessions'
statements: agents of one type share an upstream role and, through the pool, server
connections, so ``pg_stat_activity`` and ``pg_prepared_statements`` would show one
agent the statements (literals, task and principals in the tag) of another.
A policy that really needs one lists it under ``tables`` (e.g.
``pg_catalog.pg_statistic: {ops: [select]}``).
"""

from __future__ import annotations

SENSITIVE_CATALOGS: dict[str, str] = {
    "pg_authid": "password hashes",
    "pg_shadow": "password hashes",
    "pg_user_mapping": "foreign server credentials",
    "pg_user_mappings": "foreign server credentials",
    "pg_subscription": "replication connection strings",
    "pg_statistic": "sampled column values",
    "pg_statistic_ext_data": "sampled column values",
    "pg_stats": "sampled column values",
    "pg_stats_ext": "sampled column values",
    "pg_stats_ext_exprs": "sampled column values",
    "pg_largeobject": "large object contents",
    "pg_largeobject_metadata": "large object ownership",
    "pg_hba_file_rules": "the server's authentication rules",
    "pg_ident_file_mappings": "the server's identity mappings",
    "pg_file_settings": "the server's configuration files",
    "pg_db_role_setting": "per-role and per-database settings",
    "pg_config": "the server's build and file locations",
    "pg_stat_activity": "other sessions' statements, with their literals and agent tags",
    "pg_prepared_statements": "statements other clients prepared on a shared server connection",
    "pg_stat_statements": "every session's statements, with their agent tags",
}
