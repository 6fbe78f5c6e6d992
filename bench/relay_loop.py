"""The relay's own Python cost per transaction, without sockets or Postgres.

One client session and one server connection are wired to in-memory transports;
each round feeds the session a client request (a simple Query, or an extended
Parse/Bind/Describe/Execute/Sync batch) and the server connection its answer,
exactly the bytes pgbench's select-only transaction exchanges (or, with
``--script tpcb``, its TPC-B-like transaction: BEGIN, three UPDATEs, a SELECT, an
INSERT and END as simple Queries, judged as the support agent). What is left is
guardproxy's per-transaction Python: framing, response tracking, pooling,
stats and (with ``--policies``) judging and tagging. System calls and the event
loop's wake-ups are not in it, so the figure is a floor for the proxy's user CPU.

    .venv/bin/python -m bench.relay_loop [--rounds 200000] [--policies bench/policies]
                                         [--script tpcb]

With GUARDPROXY_NATIVE set (scripts/compile) it measures the compiled hot path.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import uvloop

from guardproxy.config import Settings, Upstream
from guardproxy.pool.backend import Backend
from guardproxy.protocol import codec
from guardproxy.server.app import Proxy
from guardproxy.server.login import LoginResult, bind_policy
from guardproxy.server.session import ClientSession


class MemoryTransport:
    """Enough of an asyncio transport for the relay: counts what would be written."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.written += len(chunk)

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def is_closing(self) -> bool:
        return False

    def close(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5432) if name == "peername" else default


def _query_messages(aid: int) -> bytes:
    return codec.build_query(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};")


def _answer(status: bytes = b"I") -> bytes:
    row_description = codec.message(
        b"T",
        (1).to_bytes(2, "big")
        + b"abalance\x00"
        + (0).to_bytes(4, "big")
        + (0).to_bytes(2, "big")
        + (23).to_bytes(4, "big")
        + (4).to_bytes(2, "big")
        + (-1).to_bytes(4, "big", signed=True)
        + (0).to_bytes(2, "big"),
    )
    data_row = codec.message(b"D", (1).to_bytes(2, "big") + (1).to_bytes(4, "big") + b"0")
    return (
        row_description
        + data_row
        + codec.build_command_complete("SELECT 1")
        + codec.ready_for_query(status)
    )


def _done(tag: str, status: bytes = b"T") -> bytes:
    return codec.build_command_complete(tag) + codec.ready_for_query(status)


def _tpcb(i: int, select_answer: bytes) -> list[tuple[bytes, bytes]]:
    """pgbench's TPC-B-like transaction as (request, answer) pairs."""
    aid, tid, bid, delta = 1 + i % 100000, 1 + i % 100, 1 + i % 10, i % 5000 - 2500
    steps = [
        ("BEGIN;", _done("BEGIN")),
        (
            f"UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid};",
            _done("UPDATE 1"),
        ),
        (f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};", select_answer),
        (
            f"UPDATE pgbench_tellers SET tbalance = tbalance + {delta} WHERE tid = {tid};",
            _done("UPDATE 1"),
        ),
        (
            f"UPDATE pgbench_branches SET bbalance = bbalance + {delta} WHERE bid = {bid};",
            _done("UPDATE 1"),
        ),
        (
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
            f"VALUES ({tid}, {bid}, {aid}, {delta}, CURRENT_TIMESTAMP);",
            _done("INSERT 0 1"),
        ),
        ("END;", _done("COMMIT", b"I")),
    ]
    return [(codec.build_query(sql), answer) for sql, answer in steps]


def _extended(statement: bytes, aid: int) -> bytes:
    value = str(aid).encode()
    bind = codec.message(
        b"B",
        b"\x00"
        + statement
        + b"\x00"
        + (0).to_bytes(2, "big")
        + (1).to_bytes(2, "big")
        + len(value).to_bytes(4, "big")
        + value
        + (0).to_bytes(2, "big"),
    )
    return (
        bind
        + codec.message(b"D", b"P\x00")
        + codec.message(b"E", b"\x00" + (0).to_bytes(4, "big"))
        + codec.SYNC
    )


async def measure(
    rounds: int, protocol: str, policies: Path | None, auto_prepare: int = 2
) -> float:
    settings = Settings(
        upstream="postgresql://u@127.0.0.1/db", policies=policies, auto_prepare_after=auto_prepare
    )
    upstream = Upstream(host="127.0.0.1", port=5432, user="u", password=None, database="db")
    proxy = Proxy(settings, upstream)
    session = ClientSession(proxy)
    session.connection_made(MemoryTransport())  # type: ignore[arg-type]
    if session._task is not None:
        session._task.cancel()
    agent_id = "support-bench" if protocol == "tpcb" else "analytics-bench"
    policy = context = None
    if policies is not None:
        policy, context, _ = bind_policy(proxy, agent_id, {"user": agent_id})
    session._logged_in(LoginResult(agent_id, False, (), policy=policy, context=context))
    server = Backend(upstream, 1)
    server.connection_made(MemoryTransport())  # type: ignore[arg-type]
    server.settings_key = session.relay.settings  # type: ignore[union-attr]  # as if it had served this client before
    server.app_name = session.server_app_name
    session.pool.idle.append(server)
    session.pool.servers.add(server)
    answer = _answer()
    in_transaction = _answer(b"T")
    statement = b"P0_1"
    if protocol == "extended":
        parse = codec.build_parse(
            b"", b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;", b"\x00\x00"
        )
        prefix = parse
        # the relay sends the Parse until the text is auto-prepared on this server
        # (its auto_prepare_after-th use), and answers it itself from then on
        unprepared = b"1\x00\x00\x00\x04" + b"2\x00\x00\x00\x04" + answer
        prepared = b"2\x00\x00\x00\x04" + answer
        statement = b""
    else:
        prefix = b""
    started = time.process_time()  # CPU time: other work on the machine does not count
    for i in range(rounds):
        if protocol == "tpcb":  # the transaction's statements, each answered in turn
            for request, reply in _tpcb(i, in_transaction):
                session.data_received(request)
                server.data_received(reply)
            assert session.server is None, "the server was not given back after the transaction"
            if i % 1000 == 999:
                await asyncio.sleep(0)
            continue
        aid = 1 + i % 100000
        request = (
            prefix + _extended(statement, aid) if protocol == "extended" else _query_messages(aid)
        )
        session.data_received(request)
        if protocol == "extended":
            answer = prepared if auto_prepare and i >= auto_prepare - 1 else unprepared
        server.data_received(answer)
        assert session.server is None, "the server was not given back after the transaction"
        if i % 1000 == 999:
            await asyncio.sleep(0)  # let the queued flush callbacks run, as the loop would
    return (time.process_time() - started) / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200_000)
    parser.add_argument("--policies", type=Path)
    parser.add_argument(
        "--auto-prepare",
        type=int,
        default=2,
        help="auto_prepare_after (0: off); default: %(default)s",
    )
    parser.add_argument(
        "--script",
        choices=("select-only", "tpcb"),
        default="select-only",
        help="default: %(default)s",
    )
    args = parser.parse_args()
    if args.script == "tpcb":
        args.rounds //= 7  # seven statements per transaction
    for protocol in ("simple", "extended") if args.script == "select-only" else ("tpcb",):
        # the best of three: other work on the machine only ever adds time
        per = min(
            uvloop.run(measure(args.rounds, protocol, args.policies, args.auto_prepare))
            for _ in range(3)
        )
        print(f"{protocol:9} {per * 1e6:6.2f} µs of guardproxy Python per transaction")


if __name__ == "__main__":
    main()
