from guardproxy.store import migrate
from guardproxy.store.schema_version import SCHEMA_HEAD


def test_the_schema_head_the_proxy_checks_is_the_newest_migration() -> None:
    assert migrate.head_revision() == SCHEMA_HEAD
