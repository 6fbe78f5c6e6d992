"""Functions with side effects, denied unless a policy allows them by name.

A read-only agent must not be able to do through a function call what it may not
do with a statement: read server files, kill other sessions, change settings,
consume sequences, open connections elsewhere, hold locks, sleep on a connection,
signal listeners, or run SQL held in a string (which the proxy never sees).
``set_config()`` is not on this list: the analyzer reports it as the setting change it
is, and the setting rules judge it exactly like the equivalent SET (asyncpg calls
``set_config('jit', ...)`` on its own, so a blanket denial would break it).
Functions are matched by name in any schema: ``public.pg_sleep`` is as suspicious as
``pg_catalog.pg_sleep``. Releasing one's own advisory locks
(``pg_advisory_unlock_all``, which asyncpg sends when a pooled connection is
released) and reading transaction ids are harmless and stay allowed.
"""

from __future__ import annotations

FILE = "reads or writes server files"
LARGE_OBJECTS = "reads or writes large objects"
SERVER = "controls the server or other sessions"
REPLICATION = "controls replication"
SEQUENCES = "consumes or sets sequence values"
REMOTE = "opens connections to other servers"
ADVISORY = "takes advisory locks"
SLEEP = "holds the connection idle (sleep)"
NOTIFY = "sends notifications"
DYNAMIC_SQL = "runs SQL held in a string, which the proxy cannot judge"
STATS = "resets or overwrites statistics"
OTHERS_STATEMENTS = "reveals the text of other sessions' statements"

SIDE_EFFECT_FUNCTIONS: dict[str, str] = {
    # server files
    "pg_stat_file": FILE,
    "pg_current_logfile": FILE,
    "pg_logdir_ls": FILE,
    # large objects
    "loread": LARGE_OBJECTS,
    "lowrite": LARGE_OBJECTS,
    # server and backends
    "pg_stat_get_activity": OTHERS_STATEMENTS,
    "pg_stat_get_backend_activity": OTHERS_STATEMENTS,
    "pg_prepared_statement": OTHERS_STATEMENTS,
    "pg_stat_statements": OTHERS_STATEMENTS,
    "pg_terminate_backend": SERVER,
    "pg_cancel_backend": SERVER,
    "pg_reload_conf": SERVER,
    "pg_rotate_logfile": SERVER,
    "pg_promote": SERVER,
    "pg_log_backend_memory_contexts": SERVER,
    "pg_switch_wal": SERVER,
    "pg_create_restore_point": SERVER,
    "pg_backup_start": SERVER,
    "pg_backup_stop": SERVER,
    "pg_start_backup": SERVER,
    "pg_stop_backup": SERVER,
    "pg_import_system_collations": SERVER,
    "pg_nextoid": SERVER,
    "pg_log_standby_snapshot": SERVER,
    "pg_sync_replication_slots": REPLICATION,
    "pg_prewarm": SERVER,
    # replication
    "pg_create_physical_replication_slot": REPLICATION,
    "pg_create_logical_replication_slot": REPLICATION,
    "pg_drop_replication_slot": REPLICATION,
    "pg_replication_slot_advance": REPLICATION,
    # sequences
    "nextval": SEQUENCES,
    "setval": SEQUENCES,
    # advisory locks (taking them; releasing one's own is harmless)
    "pg_advisory_lock": ADVISORY,
    "pg_advisory_lock_shared": ADVISORY,
    "pg_advisory_xact_lock": ADVISORY,
    "pg_advisory_xact_lock_shared": ADVISORY,
    "pg_try_advisory_lock": ADVISORY,
    "pg_try_advisory_lock_shared": ADVISORY,
    "pg_try_advisory_xact_lock": ADVISORY,
    "pg_try_advisory_xact_lock_shared": ADVISORY,
    # sleeping
    "pg_sleep": SLEEP,
    "pg_sleep_for": SLEEP,
    "pg_sleep_until": SLEEP,
    # notifications
    "pg_notify": NOTIFY,
    # SQL in strings: the query text is only seen by the server
    "query_to_xml": DYNAMIC_SQL,
    "query_to_xmlschema": DYNAMIC_SQL,
    "query_to_xml_and_xmlschema": DYNAMIC_SQL,
    "cursor_to_xml": DYNAMIC_SQL,
    "cursor_to_xmlschema": DYNAMIC_SQL,
    "table_to_xml": DYNAMIC_SQL,
    "table_to_xmlschema": DYNAMIC_SQL,
    "table_to_xml_and_xmlschema": DYNAMIC_SQL,
    "ts_stat": DYNAMIC_SQL,
    "ts_rewrite": DYNAMIC_SQL,
    "http": REMOTE,
    "pg_stat_statements_reset": STATS,
}

# Families of functions, by name prefix.
SIDE_EFFECT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("pg_read_", FILE),  # pg_read_file, pg_read_binary_file
    ("pg_ls_", FILE),  # pg_ls_dir, pg_ls_logdir, pg_ls_waldir, pg_ls_tmpdir, ...
    ("pg_file_", FILE),  # adminpack: pg_file_write, pg_file_rename, pg_file_unlink
    ("lo_", LARGE_OBJECTS),  # lo_import, lo_export, lo_get, lo_put, lo_unlink, ...
    ("pg_wal_replay_", SERVER),
    ("binary_upgrade_", SERVER),
    ("pg_stat_reset", STATS),
    ("pg_clear_", STATS),  # pg_clear_relation_stats, pg_clear_attribute_stats
    ("pg_restore_", STATS),  # pg_restore_relation_stats, pg_restore_attribute_stats
    ("pg_set_", STATS),  # pg_set_relation_stats, pg_set_attribute_stats
    ("pg_logical_", REPLICATION),  # slot changes, pg_logical_emit_message
    ("pg_replication_origin_", REPLICATION),
    ("pg_copy_", REPLICATION),  # pg_copy_logical_replication_slot, ...
    ("dblink", REMOTE),
    ("postgres_fdw_", REMOTE),
    ("http_", REMOTE),  # pgsql-http
    ("pg_background_", DYNAMIC_SQL),
    ("schema_to_xml", DYNAMIC_SQL),
    ("database_to_xml", DYNAMIC_SQL),
)


def side_effect(name: str) -> str | None:
    """Why a function (by bare name) is dangerous, or None if it is not on the list."""
    reason = SIDE_EFFECT_FUNCTIONS.get(name)
    if reason is not None:
        return reason
    for prefix, why in SIDE_EFFECT_PREFIXES:
        if name.startswith(prefix):
            return why
    return None
