"""The examples of docs/*.md that only a running proxy can show (`tests/docexamples.py`
marks them ``checked-by`` this file): the refusals of docs/policies.md's write safety
come back from the real proxy in the words the doc shows, up to the numbers (the doc
speaks of 500 rows and 10000, the shop has six orders)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import docexamples as dx
import psycopg
import pytest
import shop
import yaml
from pgcluster import PgCluster
from shop import POLICIES, ShopProxy, launch_proxy

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline
clean_shop = shop.clean_shop

pytestmark = pytest.mark.timeout(60)


def numbers_as_n(text: str) -> str:
    return re.sub(r"\d+", "N", text)


@pytest.fixture
def tight_support(clean_shop: PgCluster, tmp_path: Path) -> Iterator[ShopProxy]:
    """The example policies, support's caps made small enough for six orders."""
    directory = tmp_path / "policies"
    shutil.copytree(POLICIES, directory)
    path = directory / "support.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["tables"]["orders"]["max_rows_affected"] = 3
    doc["budgets"]["max_writes_per_task"] = 1
    doc["idempotency"]["mode"] = "off"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with launch_proxy(clean_shop, tmp_path / "guardproxy.log", policies=directory) as proxy:
        yield proxy


def test_the_row_cap_and_budget_refusals_of_policies_md(
    tight_support: ShopProxy, clean_shop: PgCluster
) -> None:
    before = shop.snapshot(clean_shop)["orders"]
    cap = dx.block_starting("policies.md", "support may change at most").body[0]
    budget = dx.block_starting("policies.md", "task T-17 of support is past its budget").body[0]
    with tight_support.connect("support-1", autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as refused:
            conn.execute("UPDATE orders SET fulfillment_status = 'packed' WHERE id > 0")
        assert numbers_as_n(refused.value.diag.message_primary or "") == numbers_as_n(cap)
        assert shop.snapshot(clean_shop)["orders"] == before  # nothing changed
        conn.execute("SET guard.task = 'T-17'")
        conn.execute("UPDATE orders SET fulfillment_status = 'packed' WHERE id = 4")
        with pytest.raises(psycopg.Error) as over:
            conn.execute("UPDATE orders SET fulfillment_status = 'packed' WHERE id = 5")
        assert numbers_as_n(over.value.diag.message_primary or "") == numbers_as_n(budget)
    states = {r["id"]: r["fulfillment_status"] for r in shop.snapshot(clean_shop)["orders"]}
    assert states[4] == "packed" and states[5] == "pending"  # the second write was undone


def test_the_admin_consoles_answers_to_what_it_does_not_know(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    shown = dx.block_starting("admin.md", "ERROR:  unknown admin command").body
    got: list[str] = []
    with launch_proxy(clean_shop, tmp_path / "guardproxy.log", admin_users="admin") as proxy:
        dsn = f"postgresql://admin@127.0.0.1:{proxy.port}/guardproxy"
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            for command in ("DROP TABLE orders", "SHOW USERS"):
                with pytest.raises(psycopg.Error) as refused:
                    conn.execute(command)  # type: ignore[arg-type]
                assert refused.value.diag.sqlstate == "42601"
                got += [
                    f"ERROR:  {refused.value.diag.message_primary}",
                    f"HINT:  {refused.value.diag.message_hint}",
                ]
    assert got == shown
