"""psql through the proxy: several statements in one message, \\copy, errors mid-script.

Every effect is checked on the real server with ``pg.psql`` (superuser, not
through the proxy), so a proxy that only answers "OK" without relaying fails.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest
from pgcluster import PG_BINDIR

PSQL_TIMEOUT = 30


def run_psql(
    proxy, *args: str, agent: str = "psql-agent", input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    """psql as a user would run it: no psqlrc, unaligned tuples only, bounded in time."""
    env = dict(os.environ, PGCONNECT_TIMEOUT="10", PGAPPNAME="psql-test")
    env.pop("PGOPTIONS", None)
    return subprocess.run(
        [f"{PG_BINDIR}/psql", "-X", "-A", "-t", "-d", proxy.dsn(agent), *args],
        capture_output=True,
        text=True,
        env=env,
        input=input_text,
        timeout=PSQL_TIMEOUT,
        check=False,
    )


@pytest.fixture
def table(pg):
    name = f"psql_{uuid.uuid4().hex[:10]}"
    yield name
    pg.psql(f"DROP TABLE IF EXISTS {name}")


def test_several_statements_in_one_query_message(proxy, pg, table) -> None:
    out = run_psql(
        proxy,
        "-c",
        f"CREATE TABLE {table} (id int PRIMARY KEY, label text); "
        f"INSERT INTO {table} VALUES (1, 'one'), (2, 'two'); "
        f"UPDATE {table} SET label = label || '!' WHERE id = 2; "
        f"SELECT count(*), string_agg(label, ',' ORDER BY id) FROM {table}",
    )
    assert out.returncode == 0, out.stderr
    # psql 15 shows every result of the message, in order
    assert out.stdout.split() == [
        "CREATE",
        "TABLE",
        "INSERT",
        "0",
        "2",
        "UPDATE",
        "1",
        "2|one,two!",
    ]
    assert pg.psql(f"SELECT string_agg(id || '=' || label, ',' ORDER BY id) FROM {table}") == (
        "1=one,2=two!"
    )


def test_error_inside_one_message_rolls_back_the_whole_message(proxy, pg, table) -> None:
    pg.psql(f"CREATE TABLE {table} (id int PRIMARY KEY); GRANT ALL ON {table} TO app_owner")
    # One Query message is one implicit transaction: the error undoes the first INSERT too.
    # A second -c on the same connection must still work afterwards.
    out = run_psql(
        proxy,
        "-c",
        f"INSERT INTO {table} VALUES (1); SELECT 1/0; INSERT INTO {table} VALUES (2)",
        "-c",
        f"INSERT INTO {table} VALUES (3); SELECT count(*) FROM {table}",
    )
    assert "division by zero" in out.stderr
    # psql 15 shows the first INSERT's tag before the error; the second -c sees only row 3
    assert out.stdout.splitlines() == ["INSERT 0 1", "INSERT 0 1", "1"]
    assert pg.psql(f"SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM {table}") == (
        "3"
    )


def test_copy_in_and_out_with_backslash_copy(proxy, pg, table, tmp_path: Path) -> None:
    pg.psql(
        f"CREATE TABLE {table} (id int PRIMARY KEY, name text, note text); "
        f"GRANT ALL ON {table} TO app_owner"
    )
    rows = [(i, f"name {i}", "has, comma" if i % 7 == 0 else f"n{i}") for i in range(1, 2001)]
    src = tmp_path / "in.csv"
    src.write_text("".join(f'{i},{name},"{note}"\n' for i, name, note in rows))

    out = run_psql(proxy, "-c", f"\\copy {table} FROM '{src}' WITH (FORMAT csv)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "COPY 2000"
    assert pg.psql(
        f"SELECT count(*), sum(id), count(*) FILTER (WHERE note = 'has, comma') FROM {table}"
    ) == (f"2000|{sum(range(1, 2001))}|{2000 // 7}")

    dst = tmp_path / "out.csv"
    out = run_psql(
        proxy,
        "-c",
        f"\\copy (SELECT id, name, note FROM {table} WHERE id <= 50 ORDER BY id) TO '{dst}' WITH (FORMAT csv)",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "COPY 50"
    quoted = ['"' + note + '"' if "," in note else note for _, _, note in rows[:50]]
    expected = "".join(
        f"{i},{name},{q}\n" for (i, name, _), q in zip(rows[:50], quoted, strict=True)
    )
    assert dst.read_text() == expected


def test_copy_from_stdin_in_a_script_then_more_statements(proxy, pg, table, tmp_path: Path) -> None:
    script = tmp_path / "load.sql"
    script.write_text(
        f"CREATE TABLE {table} (id int, word text);\n"
        f"COPY {table} FROM STDIN;\n"
        "1\talpha\n2\tbeta\n3\tgamma\n"
        "\\.\n"
        f"INSERT INTO {table} VALUES (4, 'delta');\n"
        f"SELECT string_agg(word, ' ' ORDER BY id) FROM {table};\n"
    )
    out = run_psql(proxy, "-v", "ON_ERROR_STOP=1", "-f", str(script))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "alpha beta gamma delta"
    assert pg.psql(f"SELECT count(*) FROM {table}") == "4"


def test_copy_in_with_bad_row_fails_and_leaves_nothing(proxy, pg, table, tmp_path: Path) -> None:
    pg.psql(f"CREATE TABLE {table} (id int PRIMARY KEY); GRANT ALL ON {table} TO app_owner")
    src = tmp_path / "bad.csv"
    src.write_text("1\n2\nnot-a-number\n4\n")
    out = run_psql(
        proxy,
        "-c",
        f"\\copy {table} FROM '{src}' WITH (FORMAT csv)",
        "-c",
        f"SELECT 'after:' || count(*) FROM {table}",
    )
    assert "invalid input syntax for type integer" in out.stderr
    # the same session goes on after the failed COPY
    assert out.stdout.strip() == "after:0"
    assert pg.psql(f"SELECT count(*) FROM {table}") == "0"


def test_error_mid_script_continues_without_on_error_stop(proxy, pg, table, tmp_path: Path) -> None:
    script = tmp_path / "script.sql"
    script.write_text(
        f"CREATE TABLE {table} (id int PRIMARY KEY);\n"
        f"INSERT INTO {table} VALUES (1);\n"
        f"INSERT INTO {table} VALUES (1);\n"  # duplicate key
        "SELECT no_such_column FROM pg_class LIMIT 1;\n"
        f"INSERT INTO {table} VALUES (2);\n"
        "BEGIN;\n"
        f"INSERT INTO {table} VALUES (10);\n"
        "SELECT 1/0;\n"
        f"INSERT INTO {table} VALUES (11);\n"  # current transaction is aborted
        "COMMIT;\n"  # turns into ROLLBACK
        f"SELECT 'ids:' || string_agg(id::text, ',' ORDER BY id) FROM {table};\n"
    )
    out = run_psql(proxy, "-f", str(script))
    assert out.returncode == 0, out.stderr
    assert "duplicate key value violates unique constraint" in out.stderr
    assert 'column "no_such_column" does not exist' in out.stderr
    assert "division by zero" in out.stderr
    assert "current transaction is aborted" in out.stderr
    assert out.stdout.strip().splitlines()[-1] == "ids:1,2"
    assert pg.psql(f"SELECT string_agg(id::text, ',' ORDER BY id) FROM {table}") == "1,2"


def test_on_error_stop_stops_at_the_first_error(proxy, pg, table, tmp_path: Path) -> None:
    script = tmp_path / "script.sql"
    script.write_text(
        f"CREATE TABLE {table} (id int PRIMARY KEY);\n"
        f"INSERT INTO {table} VALUES (1);\n"
        "SELECT 1/0;\n"
        f"INSERT INTO {table} VALUES (2);\n"
    )
    out = run_psql(proxy, "-v", "ON_ERROR_STOP=1", "-f", str(script))
    assert out.returncode == 3, (out.returncode, out.stderr)
    assert "division by zero" in out.stderr
    assert pg.psql(f"SELECT string_agg(id::text, ',' ORDER BY id) FROM {table}") == "1"


def test_single_transaction_script_rolls_back_on_error(proxy, pg, table, tmp_path: Path) -> None:
    pg.psql(f"CREATE TABLE {table} (id int PRIMARY KEY); GRANT ALL ON {table} TO app_owner")
    script = tmp_path / "script.sql"
    script.write_text(
        f"INSERT INTO {table} VALUES (1);\n"
        f"INSERT INTO {table} VALUES (2);\n"
        f"INSERT INTO {table} VALUES (2);\n"
        f"INSERT INTO {table} VALUES (3);\n"
    )
    out = run_psql(proxy, "-1", "-v", "ON_ERROR_STOP=1", "-f", str(script))
    assert out.returncode == 3, (out.returncode, out.stderr)
    assert "duplicate key value" in out.stderr
    assert pg.psql(f"SELECT count(*) FROM {table}") == "0"
    # and the proxy hands out a clean server afterwards
    out = run_psql(proxy, "-c", f"INSERT INTO {table} VALUES (7) RETURNING id")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[0] == "7"
    assert pg.psql(f"SELECT string_agg(id::text, ',') FROM {table}") == "7"


def test_psql_variables_and_gexec_over_many_transactions(proxy, pg, table) -> None:
    # \gexec runs each generated statement as its own Query; \gset reads a value back.
    out = run_psql(
        proxy,
        "-v",
        "ON_ERROR_STOP=1",
        input_text=(
            f"CREATE TABLE {table} (id int);\n"
            f"SELECT format('INSERT INTO {table} VALUES (%s)', g) FROM generate_series(1, 25) g \\gexec\n"
            f"SELECT sum(id) AS total FROM {table} \\gset\n"
            "\\echo total=:total\n"
        ),
    )
    assert out.returncode == 0, out.stderr
    assert "total=325" in out.stdout
    assert pg.psql(f"SELECT count(*), sum(id) FROM {table}") == "25|325"
