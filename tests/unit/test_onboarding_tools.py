"""The onboarding tools without a database: schema scripts (pg_dump -s, ALTER TABLE),
personal-data names, the init skeleton, key lines, the catalog half of check
--upstream, replay sources and summaries, roles and the proxy login's grants, and the
audit CLI's rendering of hostile text."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pglast
import pytest

from guardproxy.auditcli import render
from guardproxy.onboarding import replay as replaying
from guardproxy.onboarding.dbcheck import catalog_findings, explain_sql
from guardproxy.onboarding.personal import personal_kind
from guardproxy.onboarding.privileges import check_query, grant_sql, login_needs
from guardproxy.onboarding.roles import roles_sql
from guardproxy.onboarding.schema import DbSchema
from guardproxy.onboarding.skeleton import policy_skeleton
from guardproxy.onboarding.yamllines import key_lines, line_of
from guardproxy.policy import load_policy_set
from guardproxy.textsafe import visible

ROOT = Path(__file__).resolve().parents[2]
HELPDESK_SQL = (ROOT / "sql" / "helpdesk_schema.sql").read_text()

# What `pg_dump -s` (PostgreSQL 15) prints for a serial table, an identity table altered
# after its creation, and a view: psql meta-commands, SET, qualified names, keys and
# defaults added by ALTER TABLE afterwards.
PG_DUMP = r"""
--
-- PostgreSQL database dump
--

\restrict fgTJxkvpnFMjChAy0aSu2W

SET statement_timeout = 0;
SET client_encoding = 'UTF8';
SELECT pg_catalog.set_config('search_path', '', false);

CREATE TABLE public.tickets (
    id bigint NOT NULL,
    subject text NOT NULL,
    requester_email text
);
ALTER TABLE public.tickets OWNER TO helpdesk;
CREATE SEQUENCE public.tickets_id_seq START WITH 1 INCREMENT BY 1 NO MINVALUE NO MAXVALUE CACHE 1;
ALTER SEQUENCE public.tickets_id_seq OWNED BY public.tickets.id;

CREATE TABLE public.notes (
    id bigint NOT NULL,
    body text
);
ALTER TABLE public.notes ADD COLUMN author text;
ALTER TABLE public.notes ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME public.notes_id_seq
    START WITH 1
    INCREMENT BY 1
);

CREATE VIEW public.open_tickets AS
 SELECT tickets.id,
    tickets.subject
   FROM public.tickets;

ALTER TABLE ONLY public.tickets ALTER COLUMN id SET DEFAULT nextval('public.tickets_id_seq'::regclass);
ALTER TABLE ONLY public.tickets ADD CONSTRAINT tickets_pkey PRIMARY KEY (id);
COMMENT ON TABLE public.tickets IS 'tickets';
GRANT SELECT ON TABLE public.tickets TO reporting;

\unrestrict fgTJxkvpnFMjChAy0aSu2W
"""


# ---------------------------------------------------------------- schema scripts


def test_pg_dump_output_is_read_like_the_database_it_came_from() -> None:
    schema = DbSchema.from_ddl(PG_DUMP)
    tickets = schema.table("public", "tickets")
    assert tickets is not None
    assert tickets.column_names == ("id", "subject", "requester_email")
    assert tickets.primary_key == ("id",)
    assert tickets.sequences == ("public.tickets_id_seq",)
    notes = schema.table("public", "notes")
    assert notes is not None and notes.column_names == ("id", "body", "author")
    assert notes.column("id").identity and notes.sequences == ()  # type: ignore[union-attr]
    view = schema.table("public", "open_tickets")
    assert view is not None and view.kind == "view" and view.column_names == ("id", "subject")


def test_alter_table_changes_what_the_schema_says() -> None:
    schema = DbSchema.from_ddl(
        "CREATE TABLE a (id serial PRIMARY KEY, x int, y text);"
        "ALTER TABLE a ADD COLUMN z text, DROP COLUMN y;"
        "ALTER TABLE a RENAME COLUMN x TO w;"
        "ALTER TABLE a RENAME TO b;"
        "CREATE TABLE c (LIKE b);"
        "DROP TABLE c;"
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1';"
    )
    assert [t.name for t in schema.tables] == ["b"]
    b = schema.table("public", "b")
    assert b is not None and b.column_names == ("id", "w", "z")
    assert b.sequences == ("public.a_id_seq",)  # a serial keeps its sequence's name
    assert ("public", "f") in schema.functions
    assert schema.catalog().columns("public", "b") == ("id", "w", "z")


def test_a_script_that_does_not_parse_names_the_line() -> None:
    with pytest.raises(ValueError, match="line 3"):
        DbSchema.from_ddl("CREATE TABLE a (id int);\n\nCREATE TABLE b (id int,);\n")


def test_explain_reads_a_pg_dump_file_and_alter_table(tmp_path: Path) -> None:
    dump = tmp_path / "dump.sql"
    dump.write_text(
        PG_DUMP.replace(
            "public.tickets (",
            "public.customers (id bigint, name text, email text);\nCREATE TABLE public.tickets (",
        )
    )
    out = subprocess.run(
        [
            sys.executable, "-m", "guardproxy", "explain", "--schema", str(dump),
            "--agent", "analytics-1", "--json", "SELECT * FROM customers",
        ],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    doc = json.loads(out.stdout)
    # the catalog came from the dump: * is every column, email among them
    assert doc["rule"] == "tables.customers.deny_columns", doc
    assert "name" in doc["hint"] and "id" in doc["hint"], doc


# ---------------------------------------------------------------- init


@pytest.mark.parametrize(
    "name, kind",
    [
        ("email", "contact"),
        ("customer_email", "contact"),
        ("phoneNumber", "contact"),
        ("street_address", "address"),
        ("date_of_birth", "birth date"),
        ("password_hash", "credential"),
        ("api_key", "credential"),
        ("reset_token", "credential"),
        ("first_name", "name"),
        ("ip_address", "network"),
        ("card_last4", "financial"),
        ("status", None),
        ("organization_id", None),
        ("subject", None),
        ("created_at", None),
    ],
)
def test_personal_data_names(name: str, kind: str | None) -> None:
    assert personal_kind(name) == kind


def test_the_skeleton_loads_allows_nothing_and_uncomments_safely(tmp_path: Path) -> None:
    schema = DbSchema.from_ddl(HELPDESK_SQL)
    text = policy_skeleton(schema, "support", "database helpdesk")
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "support.yaml").write_text(text)
    policy = load_policy_set(directory).get("support")
    assert policy is not None and policy.tables == () and policy.read_only
    assert all(len(line) <= 100 for line in text.splitlines())
    # uncomment the users entry: its personal-data columns stay denied
    lines = text.splitlines()
    start = lines.index("  # users:")
    for i in range(start, len(lines)):
        if not lines[i].startswith("  #"):
            break
        lines[i] = lines[i].replace("# ", "", 1) if not lines[i].startswith("  ##") else lines[i]
    (directory / "support.yaml").write_text("\n".join(lines) + "\n")
    users = load_policy_set(directory).get("support")
    assert users is not None
    assert users.tables[0].deny_columns == frozenset({"email", "phone", "password_hash"})
    assert (
        "soft-delete sql tickets" in text
        and 'tickets: "organization_id = ANY({principals})"' in text
    )


# ---------------------------------------------------------------- check --upstream


def test_key_lines() -> None:
    lines = key_lines("a: 1\ntables:\n  t:\n    ops: [select,\n      insert]\n")
    assert lines[("tables", "t", "ops")] == 4
    assert lines[("tables", "t", "ops", 1)] == 5
    assert line_of(lines, ("tables", "t", "columns", 3)) == 3
    assert key_lines("a: [") == {}


POLICY_WITH_TYPOS = """\
agents: ["support-*"]
upstream_role: guard_support
statements: [read, write]
tables:
  tickets:
    ops: [select, update]
    update_columns: [sttaus]
  comments:
    ops: [select, insert]
    insert_columns: [ticket_id]
  tikets:
    ops: [select]
  "*":
    ops: [select]
  refunds:
    ops: [select, delete]
    capture_deleted_rows: true
functions:
  default: deny
  allow: [nextvall]
"""


def test_catalog_findings_name_the_file_line_and_a_close_name(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "support.yaml").write_text(POLICY_WITH_TYPOS)
    findings = catalog_findings(load_policy_set(directory), DbSchema.from_ddl(HELPDESK_SQL))
    text = "\n".join(str(f) for f in findings)
    path = directory / "support.yaml"
    assert (
        f"{path}:7: tables.tickets.update_columns[0]: no column sttaus in public.tickets; did you mean status?"
        in text
    )
    assert (
        f"{path}:11: tables.tikets: no table or view tikets in the database (search path: public); did you mean tickets?"
        in text
    )
    assert f"warning: {path}:10: tables.comments.insert_columns: leaves out body" in text
    assert (
        f"warning: {path}:20: functions.allow[0]: no function named nextvall in the database and none built in; did you mean nextval?"
        in text
    )
    # the glob: what it covers, and the personal data it exposes
    assert (
        f'info: {path}:13: tables["*"]: covers 2 tables: public.organizations, public.users' in text
    ), text
    assert (
        "covers public.users, whose columns email (contact), phone (contact), password_hash (credential) look like personal data"
        in text
    )
    assert [f.level for f in findings].count("error") == 2


def test_a_row_filter_is_planned_with_empty_principals_and_nulls() -> None:
    schema = DbSchema.from_ddl(HELPDESK_SQL)
    from guardproxy.policy.rowfilter import compile_row_filter

    condition = compile_row_filter(
        "tickets", "organization_id = ANY({principals}) AND subject <> {task}"
    )
    sql = explain_sql(schema.table("public", "tickets"), condition)  # type: ignore[arg-type]
    assert (
        sql
        == "EXPLAIN SELECT FROM public.tickets WHERE organization_id = ANY('{}') AND subject <> NULL"
    )
    pglast.parse_sql(sql)


# ---------------------------------------------------------------- replay


def _csvlog(rows: list[tuple[str, str]]) -> list[str]:
    out = io.StringIO()
    writer = csv.writer(out)
    for user, message in rows:
        # the 26 columns of a PostgreSQL 15 csvlog line; user_name 2nd, message 14th
        writer.writerow(
            ["2026-12-06 10:00:00.000 UTC", user, "helpdesk", "4242", "127.0.0.1:5000",
             "6570c0c0.1092", "1", "SELECT", "2026-12-06 10:00:00 UTC", "3/7", "0", "LOG",
             "00000", message, "", "", "", "", "", "", "", "", "psql", "client backend", "", "0"]
        )  # fmt: skip
    return out.getvalue().splitlines(keepends=True)


def test_csvlog_statements_are_read_once_each() -> None:
    lines = _csvlog(
        [
            ("app", "statement: SELECT 1"),
            ("app", "duration: 0.120 ms  statement: SELECT 2;\nSELECT 3"),
            ("app", "execute S_1: SELECT id FROM tickets WHERE id = $1"),
            ("app", "duration: 0.050 ms  parse <unnamed>: SELECT 4"),
            ("other", "statement: SELECT 5"),
            ("app", "connection authorized: user=app database=helpdesk"),
        ]
    )
    statements = replaying.from_csvlog(lines, user="app")
    assert [s.sql for s in statements] == [
        "SELECT 1",
        "SELECT 2;\nSELECT 3",
        "SELECT id FROM tickets WHERE id = $1",
    ]
    assert len(replaying.from_csvlog(lines)) == 4


def test_sql_scripts_and_json_lines() -> None:
    script = replaying.from_sql_script("\\set x 1\nSELECT 'a;b';\n-- c\nSELECT $$;$$;\n")
    assert [s.sql for s in script] == ["SELECT 'a;b'", "-- c\nSELECT $$;$$"]
    assert [s.sql for s in replaying.from_json_lines('"SELECT 1"\n\n"SELECT\\n2"\n')] == [
        "SELECT 1",
        "SELECT\n2",
    ]
    with pytest.raises(ValueError, match="line 1"):
        replaying.from_json_lines("SELECT 1\n")


def test_replay_summarises_by_outcome_and_rule_and_judges_monitor_as_enforce(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    text = (
        (ROOT / "policies" / "analytics.yaml").read_text().replace("mode: enforce", "mode: monitor")
    )
    (directory / "analytics.yaml").write_text(text)
    policy_set = load_policy_set(directory)
    policy = policy_set.get("analytics")
    assert policy is not None and policy.monitor
    statements = [
        replaying.Statement("SELECT id FROM customers WHERE id = 1", weight=3),
        replaying.Statement("SELECT email FROM customers"),
        replaying.Statement("DELETE FROM orders WHERE id = 1", weight=2),
        replaying.Statement("SET guard.task = 'T-1'"),
    ]
    summary = replaying.replay(policy_set, policy, statements, examples=1)
    data = summary.as_dict()
    assert data["statements"] == 4 and data["executions"] == 7
    assert data["outcomes"] == {"allowed": 1, "rewritten": 3, "denied": 3}
    rules = {(r["outcome"], r["rule"]): r for r in data["rules"]}
    assert rules[("denied", "statements")]["count"] == 2
    assert rules[("denied", "tables.customers.deny_columns")]["examples"][0]["sql"] == (
        "SELECT email FROM customers"
    )
    assert "nothing was sent to a database" in summary.text()
    hostile = replaying.replay(
        policy_set, policy, [replaying.Statement("SELECT '\x1b[2J' FROM payments")]
    )
    assert "\x1b" not in hostile.text() and "\\x1b[2J" in hostile.text()


# ---------------------------------------------------------------- roles and the proxy login


HELPDESK_POLICY = """\
agents: ["support-*"]
upstream_role: guard_support
statements: [read, write]
tables:
  tickets:
    ops: [select, update, delete]
    soft_delete: true
  comments:
    ops: [select, insert]
    insert_columns: [ticket_id, author_id, body]
  refunds:
    ops: [select, insert]
  "users":
    ops: [select]
    deny_columns: [email, phone, password_hash]
row_filters:
  comments:
    insert: "ticket_id > 0"
"""


@pytest.fixture
def helpdesk_policies(tmp_path: Path) -> object:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "support.yaml").write_text(HELPDESK_POLICY)
    return load_policy_set(directory)


def test_roles_grants_sequences_not_delete_on_soft_tables_and_the_login(
    helpdesk_policies: object,
) -> None:
    schema = DbSchema.from_ddl(
        HELPDESK_SQL + "ALTER TABLE tickets ADD COLUMN deleted_at timestamptz, "
        "ADD COLUMN deleted_by text, ADD COLUMN delete_reason text;"
    )
    text = roles_sql(helpdesk_policies, schema, proxy_login="helpdesk_proxy")  # type: ignore[arg-type]
    pglast.parse_sql(text)
    assert "GRANT DELETE" not in text.split("-- guardproxy's own login")[0]
    assert "-- no DELETE on public.tickets: support's deletes are soft" in text
    # serial columns: USAGE on their sequence; identity columns (refunds): nothing
    assert "GRANT USAGE ON SEQUENCE public.comments_id_seq TO guard_support;" in text
    assert "refunds_id_seq" not in text
    assert (
        "GRANT SELECT (id, organization_id, display_name, created_at) ON public.users TO guard_support;"
        in text
    )
    assert (
        "GRANT EXECUTE ON FUNCTION guardproxy.check_insert(boolean, text, text) TO guard_support"
        in text
    )
    assert "CREATE ROLE guard_support LOGIN NOSUPERUSER" in text
    assert "ALTER ROLE guard_support WITH LOGIN CONNECTION LIMIT -1;" in text
    assert "NOSUPERUSER" not in text.split("ALTER ROLE guard_support WITH")[1].split("\n")[0]
    assert "GRANT guard_support TO helpdesk_proxy;" in text
    assert "GRANT INSERT ON guardproxy.audit_events TO helpdesk_proxy;" in text


def test_roles_without_column_defaults_finds_serial_sequences_when_run(
    helpdesk_policies: object,
) -> None:
    text = roles_sql(helpdesk_policies, DbSchema.from_ddl(HELPDESK_SQL).catalog())  # type: ignore[arg-type]
    assert "pg_catalog.pg_get_serial_sequence" in text and "'public.comments'::regclass" in text
    pglast.parse_sql(text)


def test_the_login_needs_follow_the_policies(helpdesk_policies: object, tmp_path: Path) -> None:
    needs = login_needs(helpdesk_policies, "proxy")  # type: ignore[arg-type]
    names = {(n.kind, n.name, n.privilege) for n in needs}
    assert ("role", "guard_support", "MEMBER") in names
    assert ("table", "guardproxy.alembic_version", "SELECT") in names
    assert not any("idempotency_keys" in n for _, n, _ in names)  # no policy uses it
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "guard_support").write_text("pw")
    assert not any(n.kind == "role" for n in login_needs(helpdesk_policies, "proxy", secrets))  # type: ignore[arg-type]
    pglast.parse_sql(check_query(needs))
    script = "\n".join(grant_sql(needs, "proxy"))
    pglast.parse_sql(script)
    assert "GRANT SELECT, INSERT, UPDATE, DELETE ON guardproxy.proxy_instances TO proxy;" in script


# ---------------------------------------------------------------- text an agent wrote

HOSTILE = "spam [/] [bold red]x\x1b[2J\x1b]0;pwned\x07\r\u202eevil\u200b\nnext \\ end"


def test_visible_spells_out_what_a_terminal_would_act_on() -> None:
    shown = visible(HOSTILE)
    assert all(ch.isprintable() and ch not in "\u202e\u200b" for ch in shown)
    assert shown == (
        "spam [/] [bold red]x\\x1b[2J\\x1b]0;pwned\\x07\\r\\u202eevil\\u200b\\nnext \\\\ end"
    )
    assert visible(None) == "" and visible("é 日本") == "é 日本"


@pytest.mark.parametrize("layout, width", [("records", 80), ("table", 140), ("auto", 80)])
def test_audit_records_of_hostile_text_are_data_and_fit_the_width(layout: str, width: int) -> None:
    rows = [
        {"at": None, "agent": "support-1\x1b[31m", "table": "public.tickets", "primary_key": {"id": 3},
         "how": "soft", "reason": HOSTILE, "statement": "DELETE FROM tickets WHERE id = 3 " * 10},
    ]  # fmt: skip
    text = render(
        rows,
        ["at", "agent", "table", "primary_key", "how", "reason", "statement"],
        "t",
        width,
        layout,
    )
    assert "\x1b" not in text and "\u202e" not in text and "\r" not in text
    assert "spam [/] [bold" in text and "red]x" in text  # markup shown, not interpreted
    assert all(len(line) <= width for line in text.splitlines()), text
