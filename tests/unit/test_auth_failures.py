"""The table of recent failed logins stays bounded, and still limits the rate."""

import pytest

from guardproxy.config import Settings, Upstream
from guardproxy.protocol.errors import AuthFailed
from guardproxy.server import app
from guardproxy.server.app import Proxy


def _proxy() -> Proxy:
    settings = Settings(upstream="postgresql://u@127.0.0.1/db", auth_max_failures=3)
    return Proxy(
        settings, Upstream(host="127.0.0.1", port=5432, user="u", password=None, database="db")
    )


def test_logins_with_ever_new_agent_ids_do_not_grow_the_table_without_bound(monkeypatch) -> None:
    proxy = _proxy()
    clock = [1000.0]
    monkeypatch.setattr(app.time, "monotonic", lambda: clock[0])
    for i in range(30_000):
        clock[0] += 0.01  # 300 s of failures: most of them more than a minute old
        proxy.auth_failed("10.0.0.1", f"made-up-{i}")
    # the source plus the agent ids of the last minute (6,000), never 30,000
    assert len(proxy._auth_failures) <= 2 * 6_001 + app.AUTH_PRUNE_FROM
    with pytest.raises(AuthFailed):  # the flooding source is still refused
        proxy.check_auth_rate("10.0.0.1", "someone-else")


def test_a_flood_within_one_minute_is_capped(monkeypatch) -> None:
    proxy = _proxy()
    monkeypatch.setattr(app, "AUTH_FAILURE_KEYS_MAX", 5_000)
    monkeypatch.setattr(app, "AUTH_PRUNE_FROM", 1_000)
    proxy._auth_prune_at = 1_000
    for i in range(20_000):
        proxy.auth_failed(f"10.0.{i // 250}.{i % 250}", f"made-up-{i}")
    assert len(proxy._auth_failures) <= 2 * 5_000
