"""Failed-login limits (guardproxy/server/login_limits.py): counted per (source, agent id)
and per source, never per agent id alone; bounded memory; a clock of the test's own.
Through the real proxy: tests/integration/test_login_limits.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.config import Settings, Upstream
from guardproxy.protocol.errors import AuthFailed
from guardproxy.server.app import Proxy
from guardproxy.server.login_limits import REFUSAL, LoginLimits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limits(
    per_agent: int = 3, per_source: int | None = None, **kw: int
) -> tuple[LoginLimits, Clock]:
    clock = Clock()
    return LoginLimits(per_agent, per_source, clock=clock, **kw), clock


def test_failures_from_many_addresses_never_lock_out_an_agent_logging_in_elsewhere() -> None:
    lim, _ = limits(per_agent=3)
    for n in range(2, 50):  # 48 addresses, each up to its own limit and beyond
        for _ in range(5):
            lim.failed(f"10.0.0.{n}", "support-1")
    assert lim.refusal("10.0.0.1", "support-1") is None  # the real agent, its own address
    assert lim.refusal("10.0.0.1", "admin") is None
    assert lim.refusal("10.0.0.2", "support-1") == REFUSAL  # the guessing address is refused


def test_a_pair_is_refused_after_per_agent_failures_and_its_source_may_still_log_in_others() -> (
    None
):
    lim, _ = limits(per_agent=3, per_source=10)
    for _ in range(2):
        lim.failed("10.0.0.9", "support-1")
    assert lim.refusal("10.0.0.9", "support-1") is None
    lim.failed("10.0.0.9", "support-1")
    assert lim.refusal("10.0.0.9", "support-1") == REFUSAL
    assert lim.refusal("10.0.0.9", "analytics-1") is None  # the source is under its own limit


def test_one_source_spraying_agent_ids_is_refused_for_every_agent_id() -> None:
    lim, _ = limits(per_agent=3, per_source=10)
    for n in range(10):  # one guess each for ten agent ids
        assert lim.refusal("10.0.0.7", f"agent-{n}") is None
        lim.failed("10.0.0.7", f"agent-{n}")
    assert lim.refusal("10.0.0.7", "agent-99") == REFUSAL
    assert lim.refusal("10.0.0.7", "agent-0") == REFUSAL
    assert lim.refusal("10.0.0.8", "agent-0") is None


def test_the_per_source_limit_defaults_to_four_times_the_pair_limit() -> None:
    assert LoginLimits(5).per_source == 20
    assert LoginLimits(5, 2).per_source == 5  # never below the pair limit


def test_failures_count_for_a_window_then_are_forgotten() -> None:
    lim, clock = limits(per_agent=2, window=60)
    lim.failed("10.0.0.1", "a")
    clock.now += 30
    lim.failed("10.0.0.1", "a")
    assert lim.refusal("10.0.0.1", "a") == REFUSAL
    clock.now += 29.9  # the first failure is 59.9 s old
    assert lim.refusal("10.0.0.1", "a") == REFUSAL
    clock.now += 0.2  # now 60.1 s: one failure left in the window
    assert lim.refusal("10.0.0.1", "a") is None


def test_a_success_forgets_its_pair_but_not_its_source() -> None:
    lim, _ = limits(per_agent=2, per_source=4)
    for _ in range(2):
        lim.failed("10.0.0.1", "a")
    lim.failed("10.0.0.1", "b")
    assert lim.refusal("10.0.0.1", "a") == REFUSAL
    lim.succeeded("10.0.0.1", "a")  # the secret was fixed
    assert lim.refusal("10.0.0.1", "a") is None
    lim.failed("10.0.0.1", "c")  # the source's fourth failure: the success did not reset it
    assert lim.refusal("10.0.0.1", "a") == REFUSAL


def test_ever_new_agent_ids_do_not_grow_memory_beyond_the_window() -> None:
    lim, clock = limits(per_agent=3, per_source=1_000_000)
    for i in range(30_000):
        clock.now += 0.01  # 300 s of failures: most older than a minute
        lim.failed("10.0.0.1", f"made-up-{i}")
    # the source plus the pairs of the last minute (6,000), never 30,000
    assert len(lim) <= 6_001 + 1
    assert lim.refusal("10.0.0.1", "made-up-29999") is None  # one failure: under 3


def test_a_flood_within_one_window_is_capped_at_max_keys() -> None:
    lim, _ = limits(per_agent=3, max_keys=5_000)
    for i in range(20_000):
        lim.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", f"made-up-{i}")
    assert len(lim) <= 5_000


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
            st.sampled_from(["a", "b", "c"]),
            st.floats(min_value=0, max_value=30),
        ),
        max_size=60,
    )
)
def test_refusal_matches_a_plain_count_of_recent_failures(
    events: list[tuple[str, str, float]],
) -> None:
    """The bounded structure answers as a full history would."""
    lim, clock = limits(per_agent=3, per_source=5, window=60)
    history: list[tuple[float, str, str]] = []
    for source, agent, step in events:
        clock.now += step
        lim.failed(source, agent)
        history.append((clock.now, source, agent))
        for s in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
            for a in ("a", "b", "c"):
                recent = [h for h in history if clock.now - h[0] < 60]
                pair = sum(1 for _, hs, ha in recent if (hs, ha) == (s, a))
                src = sum(1 for _, hs, _ in recent if hs == s)
                expected = REFUSAL if pair >= 3 or src >= 5 else None
                assert lim.refusal(s, a) == expected, (s, a, history)


def test_the_proxy_delegates_to_its_limits() -> None:
    settings_ = Settings(upstream="postgresql://u@127.0.0.1/db", auth_max_failures=2)
    proxy = Proxy(
        settings_, Upstream(host="127.0.0.1", port=5432, user="u", password=None, database="db")
    )
    proxy.check_auth_rate("10.0.0.2", "support-1")
    for _ in range(2):
        proxy.auth_failed("10.0.0.2", "support-1")
    assert proxy.stats.auth_failures == 2
    with pytest.raises(AuthFailed) as refused:
        proxy.check_auth_rate("10.0.0.2", "support-1")
    assert refused.value.sqlstate == "28000" and "wait a minute" in refused.value.message
    proxy.check_auth_rate("10.0.0.1", "support-1")  # the agent from elsewhere: not refused
