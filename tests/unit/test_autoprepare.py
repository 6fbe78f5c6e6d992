"""Auto-prepare in the relay, without sockets: an unnamed statement sent again is
prepared once per server and reused; a stale plan is prepared again and its round run
again without the client seeing the error (relay/autoprepare.py)."""

from __future__ import annotations

from test_relay import (
    BIND_OK,
    CLOSE_OK,
    PARSE_OK,
    Harness,
    bind,
    data_row,
    done,
    execute,
    kinds,
    parse,
    ready,
)

from guardproxy.metrics import AgentStats
from guardproxy.pool.backend import BackendState
from guardproxy.protocol import codec
from guardproxy.relay.autoprepare import REMEMBERED, AutoPrepare
from guardproxy.relay.relay import Relay

STALE = codec.build_error("0A000", "cached plan must not change result type")


def auto(after: int = 1, max_prepared: int = 0) -> Harness:
    relay = Relay(
        agent_id="agent-1",
        stats=AgentStats("none", "none"),
        auto_prepare=AutoPrepare(after),
        max_prepared=max_prepared,
    )
    return Harness(relay)


def mark_stale(server: BackendState, name: bytes) -> None:
    """What the pool does to every server when a plan went stale."""
    if server.prepared.pop(name, None) is not None:
        server.to_close.add(name)


def run_once(h: Harness, sql: str = "SELECT 1") -> list[tuple[str, bytes]]:
    h.client(parse(b"", sql), bind(), execute(), codec.SYNC)
    return h.sent()


def test_the_first_time_it_is_prepared_under_its_server_name() -> None:
    h = auto()
    sent = run_once(h)
    assert kinds(sent) == "PBES"
    name = codec.parse_parse(sent[0][1]).name
    assert name.startswith(b"gp_") and codec.bind_statement(sent[1][1])[0] == name
    h.server(PARSE_OK, BIND_OK, data_row(b"1"), done("SELECT 1"), ready())
    assert kinds(h.received()) == "12DCZ"


def test_the_next_time_postgres_parses_nothing_and_the_client_sees_no_difference() -> None:
    h = auto()
    run_once(h)
    h.server(PARSE_OK, BIND_OK, data_row(b"1"), done("SELECT 1"), ready())
    h.received()
    sent = run_once(h)
    assert kinds(sent) == "BES"  # no Parse: the server has the statement
    h.server(BIND_OK, data_row(b"1"), done("SELECT 1"), ready())
    assert kinds(h.received()) == "12DCZ"  # its ParseComplete answered by the proxy


def test_a_text_is_prepared_only_once_it_was_sent_often_enough() -> None:
    h = auto(after=3)
    for _ in range(2):
        assert codec.parse_parse(run_once(h)[0][1]).name == b""
        h.server(PARSE_OK, BIND_OK, done("SELECT 1"), ready())
    assert codec.parse_parse(run_once(h)[0][1]).name.startswith(b"gp_")


def test_another_server_gets_its_own_copy() -> None:
    h = auto()
    run_once(h)
    h.server(PARSE_OK, BIND_OK, done("SELECT 1"), ready())
    h.relay.detach()
    h.backend = BackendState(serial=2)
    assert kinds(run_once(h)) == "PBES"


def test_each_server_keeps_at_most_max_prepared_statements() -> None:
    h = auto(max_prepared=1)
    first = codec.parse_parse(run_once(h, "SELECT 1")[0][1]).name
    h.server(PARSE_OK, BIND_OK, done("SELECT 1"), ready())
    sent = run_once(h, "SELECT 2")
    assert kinds(sent) == "CPBES"  # the oldest is closed first
    assert sent[0][1] == codec.build_close_statement(first)
    h.server(CLOSE_OK, PARSE_OK, BIND_OK, done("SELECT 1"), ready())
    assert list(h.backend.prepared) == [codec.parse_parse(sent[1][1]).name]


def test_a_stale_plan_is_prepared_again_and_the_round_runs_again_unseen() -> None:
    h = auto()
    run_once(h)
    h.server(PARSE_OK, BIND_OK, done("SELECT 1"), ready())
    h.received()
    name = next(iter(h.backend.prepared))
    h.relay.hooks.stale_statement = lambda stale: mark_stale(h.backend, stale)
    run_once(h)
    # a DDL changed what the statement returns: Postgres refuses the Bind, skips the rest
    h.server(STALE, ready())
    assert kinds(h.received()) == "1"  # the error and its ReadyForQuery are not shown
    assert list(h.relay.replaying)  # the round, for the session to feed again
    while h.relay.replaying:
        kind, raw = h.relay.replaying.popleft()
        h.relay.on_client(kind, raw)
    sent = h.sent()
    assert kinds(sent) == "CPBES" and codec.parse_parse(sent[1][1]).name == name
    h.server(CLOSE_OK, PARSE_OK, BIND_OK, data_row(b"1", b"2"), done("SELECT 1"), ready())
    assert kinds(h.received()) == "2DCZ"


def test_a_stale_plan_after_other_messages_of_the_round_is_the_clients_to_see() -> None:
    h = auto()
    run_once(h)
    h.server(PARSE_OK, BIND_OK, done("SELECT 1"), ready())
    h.received()
    h.relay.hooks.stale_statement = lambda stale: mark_stale(h.backend, stale)
    # something ran before the Bind in the same round: running it again would repeat it
    h.client(parse(b"", "SELECT 2"), bind(), execute())
    h.client(parse(b"", "SELECT 1"), bind(), execute(), codec.SYNC)
    h.sent()
    h.server(PARSE_OK, BIND_OK, done("SELECT 1"), STALE, ready())
    got = h.received()
    assert kinds(got) == "12C1EZ" and not h.relay.replaying
    assert codec.error_fields(got[4][1])["C"] == "0A000"


def test_what_it_remembers_is_bounded() -> None:
    prepare = AutoPrepare(2)
    for n in range(REMEMBERED + 10):
        prepare.name("t", f"SELECT {n}".encode(), b"\x00\x00", "")
    assert len(prepare._counts) <= REMEMBERED
