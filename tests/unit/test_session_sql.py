"""SQL-level PREPARE / EXECUTE / DEALLOCATE as the relay reads them (pure), and the log
formatter that keeps an agent's text from forging log lines."""

from __future__ import annotations

import logging

import pytest

from guardproxy.logs import SafeFormatter
from guardproxy.relay.session_sql import Deallocate, Execute, Mixed, Prepare, prepared_command


def test_prepare_casts_each_parameter_to_its_declared_type() -> None:
    got = prepared_command(
        b"PREPARE d (int, numeric(10, 2)) AS SELECT $1 + 1, $2, $1[1], $3 /* $1 */ FROM t"
    )
    assert isinstance(got, Prepare) and got.name == b"d"
    assert (
        got.inner == b"SELECT ($1::int) + 1, ($2::numeric(10, 2)), ($1::int)[1], $3 /* $1 */ FROM t"
    )


def test_names_fold_as_postgres_folds_them_and_text_keeps_its_characters() -> None:
    got = prepared_command("PREPARE \"Mixed\" AS SELECT 'üü' || $1".encode())
    assert isinstance(got, Prepare) and got.name == b"Mixed"
    assert got.inner == "SELECT 'üü' || $1".encode()
    got = prepared_command(b"EXECUTE Upper(1)")
    assert isinstance(got, Execute) and got.name == b"upper"


def test_execute_keeps_its_arguments_as_written() -> None:
    got = prepared_command(b"/* task='T' */ EXECUTE d(5, 'x, (y)', (SELECT 1))")
    assert isinstance(got, Execute)
    assert (got.name, got.args) == (b"d", b"5, 'x, (y)', (SELECT 1)")
    got = prepared_command(b"execute d")
    assert isinstance(got, Execute) and got.args == b""


@pytest.mark.parametrize(
    ("sql", "name"),
    [(b"DEALLOCATE d", b"d"), (b"DEALLOCATE PREPARE d", b"d"), (b"DEALLOCATE ALL", None)],
)
def test_deallocate(sql: bytes, name: bytes | None) -> None:
    got = prepared_command(sql)
    assert isinstance(got, Deallocate) and got.name == name


@pytest.mark.parametrize(
    "sql",
    [
        b"PREPARE x AS SELECT 1; EXECUTE x",
        b"SELECT 1; DEALLOCATE ALL",
        b"EXPLAIN EXECUTE x",
        b"CREATE TABLE t AS EXECUTE x",
    ],
)
def test_one_mixed_with_others_or_nested_is_refused(sql: bytes) -> None:
    assert isinstance(prepared_command(sql), Mixed)


@pytest.mark.parametrize(
    "sql", [b"SELECT 'prepare execute deallocate'", b"SELECT 1", b"EXECUTE", b"not sql at all ("]
)
def test_anything_else_is_not_a_prepared_command(sql: bytes) -> None:
    assert prepared_command(sql) is None


def test_a_log_line_cannot_be_forged_or_color_the_terminal() -> None:
    record = logging.LogRecord(
        "guardproxy",
        logging.WARNING,
        "",
        0,
        "client %s: %s",
        ("evil\n2026 INFO forged", "\x1b[31m"),
        None,
    )
    line = SafeFormatter("%(levelname)s %(message)s").format(record)
    assert line.splitlines() == ["WARNING client evil", "    2026 INFO forged: \\x1b[31m"]
