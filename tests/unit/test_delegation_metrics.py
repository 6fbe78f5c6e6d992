"""The metrics of delegation tokens, as /metrics shows them: statements run under a
token by issuer (a per-session tally, bumped by the relay), tokens refused by reason
at login (counted by the login) and at a statement (read from the agents'
``delegation.<kind>`` denials). No label ever names a principal."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from guardproxy.delegation.errors import KINDS
from guardproxy.metrics import UNCOUNTED, GuardproxyCollector, PoolView, StatsRegistry


def exposed(stats: StatsRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GuardproxyCollector(stats, lambda: [PoolView("default", dict)]))
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_statements_under_a_token_are_counted_by_issuer() -> None:
    stats = StatsRegistry()
    support = stats.for_agent("support", "support-1")
    tally = support.delegation_tally("shop-app")
    assert support.delegation_tally("shop-app") is tally  # one tally per issuer
    for _ in range(3):
        tally.n += 1  # what the relay does per statement
    support.delegation_tally("crm").n += 1
    UNCOUNTED.n += 5  # sessions without a token: counted nowhere
    samples = exposed(stats)
    labels = (("agent", "support-1"), ("agent_type", "support"))
    assert samples["guardproxy_delegated_statements_total", (*labels, ("issuer", "shop-app"))] == 3
    assert samples["guardproxy_delegated_statements_total", (*labels, ("issuer", "crm"))] == 1
    assert [k for k in samples if k[0] == "guardproxy_delegated_statements_total"] == [
        ("guardproxy_delegated_statements_total", (*labels, ("issuer", i)))
        for i in ("shop-app", "crm")
    ]


def test_refused_tokens_are_counted_by_reason_at_login_and_at_statements() -> None:
    stats = StatsRegistry()
    stats.token_refused("support", "signature")
    stats.token_refused("support", "signature")
    stats.token_refused("support", "expired")
    one, two = stats.for_agent("support", "support-1"), stats.for_agent("support", "support-2")
    one.denials["delegation.expired"] += 2  # what the judge counts when it refuses
    two.denials["delegation.expired"] += 1
    two.denials["delegation.missing"] += 4
    one.denials["delegation"] += 3  # a context key a token decides: not a refused token
    one.denials["tables"] += 7
    samples = exposed(stats)

    def refused(reason: str, at: str) -> float:
        key = (("agent_type", "support"), ("at", at), ("reason", reason))
        return samples.get(("guardproxy_delegation_refusals_total", key), 0.0)

    assert refused("signature", "login") == 2 and refused("expired", "login") == 1
    assert refused("expired", "statement") == 3 and refused("missing", "statement") == 4
    reasons = {
        dict(labels)["reason"]
        for name, labels in samples
        if name == "guardproxy_delegation_refusals_total"
    }
    assert reasons == {"signature", "expired", "missing"} and reasons <= set(KINDS)
    # the denials themselves are unchanged
    key = (("agent", "support-1"), ("agent_type", "support"), ("rule", "delegation.expired"))
    assert samples["guardproxy_denials_total", key] == 2
