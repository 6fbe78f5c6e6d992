"""Every Prometheus metric of guardproxy, defined once.

The hot path never touches prometheus_client: sessions and pools bump plain
attributes (ints, floats, small bucket arrays) on objects they own, and the
collector here turns them into samples when Prometheus scrapes. No locks, no
label lookups per message.

Labels are bounded by configuration: ``agent_type`` (policy names), ``agent``
(only agent ids listed in the auth file; in trust mode all agents of a type
share the agent label ``*``), ``kind`` and ``decision`` (fixed sets), ``rule``
(policy rule names), ``issuer`` (the ``delegation_issuers`` of the settings: only
verified tokens are counted by issuer), ``reason`` (`delegation.errors.KINDS`).
Principals are never a label (there is no bound on them): audit events and
statement tags carry them.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# seconds; statement and transaction durations of agents span ms to minutes
BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
DECISIONS = ("allowed", "denied", "rewritten", "replayed", "truncated", "monitored")
DELEGATION_RULE = "delegation."  # denials of a token: rule delegation.<TokenError.kind>


class Tally:
    """One counter a session holds and bumps with ``tally.n += 1``: no lookup, no lock."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


#: The tally of sessions without a delegation token: counted nowhere.
UNCOUNTED = Tally()


class Histogram:
    """A fixed-bucket histogram: one bisect and two additions per observation."""

    __slots__ = ("counts", "n", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.n += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


@dataclass
class AgentStats:
    """What one agent (or one agent type, in trust mode) did, since the proxy started."""

    agent_type: str
    agent: str
    statements: defaultdict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    denials: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    statement_time: Histogram = field(default_factory=Histogram)
    transaction_time: Histogram = field(default_factory=Histogram)
    rows_returned: int = 0
    rows_affected: int = 0
    timeouts: int = 0
    cancels: int = 0
    aborted_transactions: int = 0
    replays: int = 0
    sessions: int = 0  # open now
    sessions_total: int = 0
    # issuer -> statements run under its verified delegation tokens
    delegated: dict[str, Tally] = field(default_factory=dict)

    def delegation_tally(self, issuer: str) -> Tally:
        """The tally a session bumps per statement while it holds a token of `issuer`
        (taken once, when the token is bound: see docs/observability.md)."""
        tally = self.delegated.get(issuer)
        if tally is None:
            tally = self.delegated[issuer] = Tally()
        return tally


class StatsRegistry:
    def __init__(self) -> None:
        self.agents: dict[tuple[str, str], AgentStats] = {}
        self.cache_hits = 0
        self.cache_misses = 0
        self.proxy_latency = Histogram()
        self.audit_events_lost = 0
        self.audit_events_rejected = 0
        self.auth_failures = 0
        # (agent_type, reason) -> delegation tokens refused at login
        self.token_refusals: defaultdict[tuple[str, str], int] = defaultdict(int)

    def token_refused(self, agent_type: str, reason: str) -> None:
        """A delegation token presented at login (password, options) was refused;
        `reason` is its `TokenError.kind`. Refusals of statements are read from the
        agents' ``delegation.<kind>`` denials."""
        self.token_refusals[agent_type, reason] += 1

    def for_agent(self, agent_type: str, agent: str) -> AgentStats:
        key = (agent_type, agent)
        stats = self.agents.get(key)
        if stats is None:
            stats = self.agents[key] = AgentStats(agent_type, agent)
        return stats


@dataclass
class PoolView:
    """What the collector reads from a pool (filled by the server package)."""

    name: str
    snapshot: Callable[[], dict[str, float]]


class GuardproxyCollector(Collector):
    def __init__(self, stats: StatsRegistry, pools: Callable[[], Iterable[PoolView]]) -> None:
        self.stats = stats
        self.pools = pools

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        s = self.stats
        lab = ["agent_type", "agent"]
        statements = CounterMetricFamily(
            "guardproxy_statements",
            "Statements by agent, kind and decision",
            labels=[*lab, "kind", "decision"],
        )
        denials = CounterMetricFamily(
            "guardproxy_denials", "Denied statements by policy rule", labels=[*lab, "rule"]
        )
        stmt_time = HistogramMetricFamily(
            "guardproxy_statement_duration_seconds",
            "DB time per statement: from sending it upstream to its CommandComplete",
            labels=lab,
        )
        tx_time = HistogramMetricFamily(
            "guardproxy_transaction_duration_seconds",
            "Time a server connection was lent per transaction",
            labels=lab,
        )
        rows_ret = CounterMetricFamily(
            "guardproxy_rows_returned", "Rows returned to agents", labels=lab
        )
        rows_aff = CounterMetricFamily(
            "guardproxy_rows_affected", "Rows inserted, updated or deleted", labels=lab
        )
        timeouts = CounterMetricFamily(
            "guardproxy_timeouts", "Statements and transactions ended by a timeout", labels=lab
        )
        cancels = CounterMetricFamily("guardproxy_cancels", "Cancel requests forwarded", labels=lab)
        aborted = CounterMetricFamily(
            "guardproxy_aborted_transactions", "Transactions that ended in error", labels=lab
        )
        replays = CounterMetricFamily(
            "guardproxy_idempotent_replays", "Writes answered from the ledger", labels=lab
        )
        sessions = GaugeMetricFamily(
            "guardproxy_client_sessions", "Client sessions open now", labels=lab
        )
        delegated = CounterMetricFamily(
            "guardproxy_delegated_statements",
            "Statements run under a verified delegation token, by its issuer",
            labels=[*lab, "issuer"],
        )
        refused: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        for (agent_type, reason), count in s.token_refusals.items():
            refused[agent_type, reason, "login"] += count
        for a in s.agents.values():
            values = [a.agent_type, a.agent]
            for (kind, decision), count in a.statements.items():
                statements.add_metric([*values, kind, decision], count)
            for rule, count in a.denials.items():
                denials.add_metric([*values, rule], count)
                if rule.startswith(DELEGATION_RULE):
                    refused[a.agent_type, rule[len(DELEGATION_RULE) :], "statement"] += count
            for issuer, tally in a.delegated.items():
                delegated.add_metric([*values, issuer], tally.n)
            stmt_time.add_metric(values, a.statement_time.cumulative(), a.statement_time.total)
            tx_time.add_metric(values, a.transaction_time.cumulative(), a.transaction_time.total)
            rows_ret.add_metric(values, a.rows_returned)
            rows_aff.add_metric(values, a.rows_affected)
            timeouts.add_metric(values, a.timeouts)
            cancels.add_metric(values, a.cancels)
            aborted.add_metric(values, a.aborted_transactions)
            replays.add_metric(values, a.replays)
            sessions.add_metric(values, a.sessions)
        yield from (
            statements,
            denials,
            stmt_time,
            tx_time,
            rows_ret,
            rows_aff,
            timeouts,
            cancels,
            aborted,
            replays,
            sessions,
            delegated,
        )
        refusals = CounterMetricFamily(
            "guardproxy_delegation_refusals",
            "Delegation tokens refused, by reason, at login or at a statement",
            labels=["agent_type", "reason", "at"],
        )
        for labels, count in sorted(refused.items()):
            refusals.add_metric(list(labels), count)
        yield refusals

        cache = CounterMetricFamily(
            "guardproxy_decision_cache", "Decision cache lookups", labels=["result"]
        )
        cache.add_metric(["hit"], s.cache_hits)
        cache.add_metric(["miss"], s.cache_misses)
        yield cache
        latency = HistogramMetricFamily(
            "guardproxy_proxy_added_seconds",
            "Time the proxy spends judging and rewriting a statement",
        )
        latency.add_metric([], s.proxy_latency.cumulative(), s.proxy_latency.total)
        yield latency
        lost = CounterMetricFamily(
            "guardproxy_audit_events_lost", "Audit events dropped (queue full or store down)"
        )
        lost.add_metric([], s.audit_events_lost)
        yield lost
        rejected = CounterMetricFamily(
            "guardproxy_audit_events_rejected",
            "Audit events the store refused even alone (kept as a placeholder row)",
        )
        rejected.add_metric([], s.audit_events_rejected)
        yield rejected
        auth = CounterMetricFamily("guardproxy_auth_failures", "Failed client logins")
        auth.add_metric([], s.auth_failures)
        yield auth

        pool_gauges = {
            "clients_active": GaugeMetricFamily(
                "guardproxy_pool_clients_active", "Clients holding a server", labels=["pool"]
            ),
            "clients_waiting": GaugeMetricFamily(
                "guardproxy_pool_clients_waiting", "Clients waiting for a server", labels=["pool"]
            ),
            "servers_active": GaugeMetricFamily(
                "guardproxy_pool_servers_active", "Server connections lent now", labels=["pool"]
            ),
            "servers_idle": GaugeMetricFamily(
                "guardproxy_pool_servers_idle",
                "Server connections idle in the pool",
                labels=["pool"],
            ),
            "servers_max": GaugeMetricFamily(
                "guardproxy_pool_servers_max", "pool_size of the pool", labels=["pool"]
            ),
            "pinned": GaugeMetricFamily(
                "guardproxy_pool_pinned_sessions",
                "Sessions pinned to their server now",
                labels=["pool"],
            ),
        }
        pool_counters = {
            "acquired": CounterMetricFamily(
                "guardproxy_pool_servers_used", "Server connections lent", labels=["pool"]
            ),
            "wait_seconds": CounterMetricFamily(
                "guardproxy_pool_wait_seconds",
                "Seconds clients waited for a server",
                labels=["pool"],
            ),
            "acquire_timeouts": CounterMetricFamily(
                "guardproxy_pool_acquire_timeouts", "Clients that got 53300", labels=["pool"]
            ),
            "connect_errors": CounterMetricFamily(
                "guardproxy_pool_connect_errors", "Failed upstream connects", labels=["pool"]
            ),
        }
        for view in self.pools():
            snap = view.snapshot()
            for key, gauge in pool_gauges.items():
                gauge.add_metric([view.name], snap.get(key, 0.0))
            for key, counter in pool_counters.items():
                counter.add_metric([view.name], snap.get(key, 0.0))
        yield from pool_gauges.values()
        yield from pool_counters.values()
