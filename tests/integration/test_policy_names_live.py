"""Issue 13's judge classes through the real proxy, by effect.

* Names: every form by which a name can reach ``customers.email`` (the ``JOIN ...
  USING (...) AS j`` alias, ``USING`` / ``NATURAL`` join keys, ``c.row_to_json`` in
  functional notation, renamed join columns, derived tables, LATERAL, ORDER BY,
  whole-row references...) is refused to the analytics agent, and no email address
  appears in any byte it receives; a name guardproxy cannot resolve is refused too.
  Ordinary queries over the same forms still return their rows.
* Read caps: ``FETCH FIRST n ROWS WITH TIES`` with an ORDER BY that makes every row
  tie returns at most the cap, in a result and through a cursor.
* Soft-deleted parents: once support deleted order 6, a state-log row for it is
  refused (INSERT, a driver's parameter, COPY FROM), the log is unchanged, and the
  message names the agent type, the rule and the order; a live order is still fine;
  ``soft_deleted_parents: allow`` lets it through.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import shop
from pgcluster import PgCluster
from proofkit import policies_with
from psycopg import errors
from shop import SHOP_DB, RawAgent, ShopProxy, assert_names, assert_no_secret, launch_proxy

pytestmark = pytest.mark.timeout(120)

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline
clean_shop = shop.clean_shop

ROOT = Path(__file__).resolve().parents[2]
CAP = 1000  # policies/analytics.yaml, limits.max_rows_returned
PARENTS_RULE = "tables.order_state_log.soft_deleted_parents"


@pytest.fixture(scope="module")
def proxy(shop_db: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShopProxy]:
    log = tmp_path_factory.mktemp("names") / "guardproxy.log"
    with launch_proxy(shop_db, log) as handle:
        yield handle


def refused(proxy: ShopProxy, agent: str, sql: str, rule: str) -> shop.Reply:
    """Runs `sql` as one Query; it must be refused with `rule`, leak no secret, and leave
    the session usable."""
    with RawAgent(proxy.port, agent) as raw:
        reply = raw.query(sql)
        assert reply.errors, f"not refused: {sql} -> {reply.rows[:3]}"
        assert reply.rows == [], reply.rows
        assert_no_secret(reply.text)
        assert_names(reply.error.get("M", ""), agent.split("-")[0], rule, "")
        assert reply.error.get("H"), reply.error
        assert raw.query("select 1").rows == [["1"]]
    return reply


# -- names ---------------------------------------------------------------------------

EMAIL_FORMS = [
    "SELECT j.email FROM customers a JOIN customers b USING (email) AS j",
    "SELECT j FROM customers a JOIN customers b USING (email) AS j",
    "SELECT row_to_json(j) FROM customers a JOIN customers b USING (email) AS j",
    "SELECT u.email FROM (customers a JOIN customers b USING (email) AS u) JOIN orders o ON true",
    "SELECT a.id FROM customers a JOIN customers b USING (email)",
    "SELECT a.id FROM customers a JOIN (SELECT 'ada@example.com'::text AS email) b USING (email)",
    "SELECT a.id FROM customers a NATURAL JOIN (SELECT 'ada@example.com'::text AS email) b",
    "SELECT c.row_to_json FROM customers c",
    "SELECT c.concat FROM customers c",
    "SELECT c.array_agg FROM customers c",
    "SELECT customers.to_jsonb FROM customers",
    "SELECT j.c FROM (customers a JOIN orders o ON o.customer_id = a.id) AS j(x, y, c)",
    "SELECT j.email FROM (customers a JOIN orders o ON o.customer_id = a.id) AS j",
    "SELECT j FROM (customers a JOIN orders o ON o.customer_id = a.id) AS j",
    "SELECT j.id FROM (customers a JOIN orders o ON a.email = 'ada@example.com') AS j",
    "SELECT x.e FROM (SELECT email AS e FROM customers) x",
    "WITH x AS (SELECT email FROM customers) SELECT x.email FROM x",
    "SELECT l.e FROM customers c, LATERAL (SELECT c.email AS e) l",
    "SELECT f.x FROM customers c, LATERAL to_jsonb(c) AS f(x)",
    "SELECT t.c FROM customers t(a, b, c)",
    "SELECT name FROM customers ORDER BY email",
    "SELECT DISTINCT ON (email) name FROM customers",
    "SELECT name FROM customers ORDER BY customers",
    "COPY (SELECT j.email FROM customers a JOIN customers b USING (email) AS j) TO STDOUT",
]


@pytest.mark.parametrize("sql", EMAIL_FORMS)
def test_no_form_of_a_name_reads_a_denied_column(proxy, sql) -> None:
    reply = refused(proxy, shop.ANALYTICS, sql, "tables.customers.deny_columns")
    assert reply.error.get("C") == "42501"


def test_the_same_through_the_extended_protocol(proxy) -> None:
    with proxy.connect(shop.ANALYTICS, autocommit=True) as conn:
        for sql in (
            "SELECT j.email FROM customers a JOIN customers b USING (email) AS j WHERE a.id = %s",
            "SELECT c.row_to_json FROM customers c WHERE c.id = %s",
        ):
            with pytest.raises(errors.InsufficientPrivilege) as caught:
                conn.execute(sql, (1,), prepare=True)
            assert "customers" in str(caught.value) and "@example.com" not in str(caught.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT nope FROM customers",
        "SELECT x.name FROM customers",
        "SELECT customers.name FROM customers c",
        "SELECT a.name FROM (customers a JOIN orders o ON true) AS j",
    ],
)
def test_a_name_that_resolves_to_nothing_is_refused(proxy, sql) -> None:
    reply = refused(proxy, shop.ANALYTICS, sql, "unresolved")
    assert "cannot trace to a table column" in reply.error["M"]


def test_ordinary_forms_still_return_their_rows(proxy) -> None:
    with proxy.connect(shop.ANALYTICS, autocommit=True) as conn:
        names = conn.execute(
            "SELECT j.name FROM (customers a JOIN orders o ON o.customer_id = a.id) AS j "
            "WHERE j.customer_id = 1 ORDER BY 1"
        ).fetchall()
        assert names == [("Ada Lovelace",), ("Ada Lovelace",)]
        assert conn.execute(
            "SELECT j.id, a.name FROM customers a JOIN customers b USING (id) AS j ORDER BY j.id"
        ).fetchall()[0] == (1, "Ada Lovelace")
        assert conn.execute("SELECT g.g FROM generate_series(1, 3) g").fetchall() == [
            (1,),
            (2,),
            (3,),
        ]
        assert conn.execute(
            "SELECT name AS email FROM customers ORDER BY email LIMIT 1"
        ).fetchone() == ("Ada Lovelace",)
        # a system column is a column (the role's column grants on customers refuse it)
        assert conn.execute("SELECT count(*) FROM orders WHERE ctid IS NOT NULL").fetchone() == (6,)


# -- read caps --------------------------------------------------------------------------


@pytest.fixture
def many_customers(clean_shop: PgCluster) -> PgCluster:
    clean_shop.psql(
        "insert into customers (name, email) select 'c' || g, 'cap' || g || '@x' "
        "from generate_series(1, 1500) g",
        dbname=SHOP_DB,
    )
    return clean_shop


def test_with_ties_cannot_pass_the_cap(proxy, many_customers) -> None:
    notices: list[str] = []
    with proxy.connect(shop.ANALYTICS, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        # every row ties with the first: WITH TIES alone would return all 1504
        rows = conn.execute(
            "SELECT id FROM customers ORDER BY length('x') FETCH FIRST 1 ROWS WITH TIES"
        ).fetchall()
        assert len(rows) == CAP
        assert any(f"truncated to {CAP} rows" in n for n in notices), notices
        small = conn.execute(
            "SELECT id FROM customers WHERE id <= 3 ORDER BY length('x') FETCH FIRST 1 ROWS WITH TIES"
        ).fetchall()
        assert len(small) == 3  # under the cap, the ties are all there
    with proxy.connect(shop.ANALYTICS) as conn:
        conn.execute(
            "DECLARE c CURSOR FOR SELECT id FROM customers ORDER BY length('x') "
            "FETCH FIRST 1 ROWS WITH TIES"
        )
        fetched = sum(len(conn.execute("FETCH 700 FROM c").fetchall()) for _ in range(3))
        assert fetched == CAP
        conn.rollback()


def test_copy_with_ties_is_stopped_by_the_server(proxy, many_customers) -> None:
    """The judge gives COPY's query the LIMIT N + 1 (the runtime cuts to N)."""
    out = io.BytesIO()
    with proxy.connect(shop.ANALYTICS, autocommit=True) as conn:
        cur = conn.cursor()
        with cur.copy(
            "COPY (SELECT id FROM customers ORDER BY length('x') FETCH FIRST 1 ROWS WITH TIES) "
            "TO STDOUT"
        ) as copy:
            for data in copy:
                out.write(data)
    lines = out.getvalue().splitlines()
    assert CAP <= len(lines) <= CAP + 1, len(lines)


# -- soft-deleted parents -------------------------------------------------------------------


@pytest.fixture
def order_6_deleted(proxy, clean_shop: PgCluster) -> PgCluster:
    with proxy.connect(shop.SUPPORT, autocommit=True) as conn:
        assert conn.execute("DELETE FROM orders WHERE id = 6").statusmessage == "DELETE 1"
    assert clean_shop.psql(
        "select deleted_at is not null from orders where id = 6", dbname=SHOP_DB
    ) == ("t")
    return clean_shop


def log_rows(pg: PgCluster) -> str:
    return pg.psql(
        "select coalesce(string_agg(order_id || ':' || new_status, ',' order by id), '') "
        "from order_state_log",
        dbname=SHOP_DB,
    )


def _documented_error() -> tuple[str, str]:
    """The error and hint docs/policies.md shows, as patterns (any time of deletion)."""
    lines = (ROOT / "docs" / "policies.md").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("ERROR:  support may not write"))
    message = re.escape(lines[at].removeprefix("ERROR:  "))
    message = message.replace(re.escape("2024-05-23 08:00:00+00"), ".+")
    return message, re.escape(lines[at + 1].removeprefix("HINT:  "))


INSERT_LOG = (
    "INSERT INTO order_state_log (order_id, previous_status, new_status, changed_by, reason) "
    "VALUES ({order}, 'cancelled', 'returned', 'support-1', 'customer sent it back')"
)


def test_a_child_row_for_a_soft_deleted_order_is_refused(proxy, order_6_deleted) -> None:
    pg = order_6_deleted
    before = log_rows(pg)
    with RawAgent(proxy.port, shop.SUPPORT) as raw:
        reply = raw.query(INSERT_LOG.format(order="6"))
        error = reply.error
        assert error.get("C") == "23503", error
        assert_names(error["M"], "support", PARENTS_RULE, "order_state_log.order_id = 6")
        assert "soft-deleted" in error["M"] and "orders" in error["M"]
        assert "not deleted" in error.get("H", "")
        documented = _documented_error()
        assert re.fullmatch(documented[0], error["M"]), (documented, error)
        assert re.fullmatch(documented[1], error["H"]), (documented, error)
        assert reply.tags == []
        # a quoted number is typed as the column would type it
        assert raw.query(INSERT_LOG.format(order="'6'")).error.get("C") == "23503"
        assert raw.query("select 1").rows == [["1"]]
    assert log_rows(pg) == before
    with proxy.connect(shop.SUPPORT, autocommit=True) as conn:
        cur = conn.execute(INSERT_LOG.format(order="%s"), (5,))
        assert cur.statusmessage == "INSERT 0 1"
        with pytest.raises(errors.ForeignKeyViolation):
            conn.execute(INSERT_LOG.format(order="%s"), (6,))
    assert log_rows(pg) == before + ",5:returned"


async def test_a_driver_parameter_is_checked_and_keeps_its_type(proxy, order_6_deleted) -> None:
    pg = order_6_deleted
    before = log_rows(pg)
    conn = await asyncpg.connect(proxy.dsn(shop.SUPPORT), timeout=10)
    try:
        statement = await conn.prepare(INSERT_LOG.format(order="$1"))
        assert [t.name for t in statement.get_parameters()] == ["int8"]
        with pytest.raises(asyncpg.ForeignKeyViolationError) as caught:
            await statement.fetch(6)
        assert PARENTS_RULE in str(caught.value)
        await statement.fetch(4)
    finally:
        await conn.close()
    assert log_rows(pg) == before + ",4:returned"


def test_copy_from_for_a_soft_deleted_order_inserts_nothing(proxy, order_6_deleted) -> None:
    pg = order_6_deleted
    before = log_rows(pg)
    sql = "COPY order_state_log (order_id, new_status, changed_by) FROM STDIN"
    with proxy.connect(shop.SUPPORT, autocommit=True) as conn:
        cur = conn.cursor()
        with pytest.raises(errors.ForeignKeyViolation), cur.copy(sql) as copy:
            copy.write_row((5, "returned", "support-1"))
            copy.write_row((6, "returned", "support-1"))
        assert log_rows(pg) == before  # one statement: the live order's row is gone too
        with cur.copy(sql) as copy:
            copy.write_row((5, "returned", "support-1"))
        assert cur.statusmessage == "COPY 1"
    assert log_rows(pg) == before + ",5:returned"


def test_the_policy_switch_lets_children_of_deleted_rows_through(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    policies = policies_with(
        tmp_path,
        support={"tables": {"order_state_log": {"soft_deleted_parents": "allow"}}},
    )
    with (
        launch_proxy(clean_shop, tmp_path / "guardproxy.log", policies=policies) as allowing,
        allowing.connect(shop.SUPPORT, autocommit=True) as conn,
    ):
        conn.execute("DELETE FROM orders WHERE id = 6")
        cur = conn.execute(INSERT_LOG.format(order="6"))
        assert cur.statusmessage == "INSERT 0 1"
    assert log_rows(clean_shop).endswith(",6:returned")
