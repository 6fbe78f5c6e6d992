"""Hostile input on the wire: hypothesis against a live proxy (SCRAM, example policies).

Three fuzzers, each a bounded number of examples:

* the startup path: random bytes, startup packets with random parameters and protocol
  codes, mutated (bytes flipped, lengths rewritten, cut short, junk appended), SSL /
  GSS / cancel requests in front;
* the SCRAM exchange: a valid startup, then random or mutated SASLInitialResponse and
  SASLResponse messages (mechanisms, GS2 headers, nonces, proofs, lengths, types);
* the message stream after a real SCRAM login: random typed messages (Query, Parse,
  Bind, Describe, Execute, Close, Sync, Flush, COPY messages, FunctionCall, unknown
  types), with bodies valid, random or cut, and messages cut short, lengths below 4
  or above max_message_size.

For every input: everything the proxy sends parses as well-formed backend messages;
an error carries severity, SQLSTATE and message; when the proxy closes the connection
on its own it has said why with a FATAL ErrorResponse (a cancel request and Terminate
excepted); it never logs anyone in without a valid proof; after the input the
connection is answered or closed within bounded time (no hang: every read has a
timeout, and a connection left open must still answer a Sync and a Query, or close);
the process stays alive, its log shows no unhandled exception, and its resident memory
stays bounded. The pure codec (MessageReader, parse_startup) has its own hypothesis
tests in tests/unit/test_codec.py.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import scramp
import shop
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pgcluster import PgCluster
from proofkit import launch, policies_with, rss_kb
from shop import ShopProxy

from guardproxy.protocol import codec
from guardproxy.protocol.scram import write_verifier

pytestmark = pytest.mark.timeout(240)

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline

MAX_MESSAGE = 65536
PASSWORD = "fuzz-secret-pw"
AGENTS = ("support-fuzz", "analytics-fuzz")
QUIET = 0.15  # no byte for this long: the proxy has said what it had to say
CLOSE_WITHIN = 3.0  # after we half-close, the proxy must close within this
PROBE_WITHIN = 5.0  # a connection left open must answer Sync + Query within this
RSS_SLACK_KB = 40 * 1024
BACKEND_KINDS = frozenset(b"RSKZENTDCI123nstGHWdcAvV")
CANCEL = struct.pack("!i", codec.CANCEL_REQUEST)
RELAYED_CANCEL = struct.pack("!i", codec.RELAYED_CANCEL_REQUEST)  # between instances


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=(Phase.explicit, Phase.generate),  # no shrinking: bounded time; input printed
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@dataclass
class Tally:
    inputs: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)


TALLY: dict[str, Tally] = {}


# ---------------------------------------------------------------- the proxy under fuzz


@pytest.fixture(scope="module")
def fuzz_proxy(
    shop_db: PgCluster, shop_baseline: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ShopProxy]:
    home = tmp_path_factory.mktemp("fuzz")
    auth_file = home / "agents.auth"
    for agent in AGENTS:
        write_verifier(auth_file, agent, PASSWORD)
    with launch(
        shop_db,
        home / "guardproxy.log",
        policies_with(home),
        auth_mode="scram",
        auth_file=auth_file,
        auth_max_failures=1_000_000_000,  # the rate limit would refuse the fuzzer, not fuzz
        max_message_size=MAX_MESSAGE,
        client_login_timeout=5,
        pool_size=2,
    ) as proxy:
        yield proxy
        print("\nFUZZ FIGURES:")
        for name, tally in TALLY.items():
            print(f"  {name}: {tally.inputs} inputs, outcomes {dict(tally.outcomes)}")
        print(f"  total inputs: {sum(t.inputs for t in TALLY.values())}")
    if shop.snapshot(shop_db) != shop_baseline:
        shop.restore_shop(shop_db)


# ---------------------------------------------------------------- a bounded raw client


class ProtocolBreach(AssertionError):
    pass


def split_backend(data: bytes) -> list[tuple[int, bytes]]:
    """The proxy's bytes as (type, whole message); one-byte 'N'/'S' SSL/GSS answers too."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        kind = data[pos]
        if kind in b"NS" and (pos + 1 == len(data) or data[pos + 1] != 0):
            out.append((kind, data[pos : pos + 1]))  # the answer to SSLRequest / GSSENCRequest
            pos += 1
            continue
        if kind not in BACKEND_KINDS:
            raise ProtocolBreach(f"unknown backend message type {chr(kind)!r} at {pos}: {data!r}")
        if len(data) - pos < 5:
            raise ProtocolBreach(f"a cut message header at the end: {data[pos:]!r}")
        (length,) = struct.unpack_from("!i", data, pos + 1)
        if length < 4 or pos + 1 + length > len(data):
            raise ProtocolBreach(f"a message of length {length} at {pos} in {len(data)} bytes")
        out.append((kind, data[pos : pos + 1 + length]))
        pos += 1 + length
    return out


def check_messages(msgs: list[tuple[int, bytes]]) -> None:
    for kind, raw in msgs:
        if kind == ord("E") and len(raw) > 1:
            fields = codec.error_fields(raw)
            assert fields.get("S") in ("ERROR", "FATAL"), f"error without severity: {raw!r}"
            assert len(fields.get("C", "")) == 5, f"error without SQLSTATE: {raw!r}"
            assert fields.get("M"), f"error without a message: {raw!r}"


def fatal(msgs: list[tuple[int, bytes]]) -> bool:
    return any(
        kind == ord("E") and len(raw) > 1 and codec.error_fields(raw).get("S") == "FATAL"
        for kind, raw in msgs
    )


def auth_codes(msgs: list[tuple[int, bytes]]) -> list[int]:
    return [codec.auth_code(raw) for kind, raw in msgs if kind == ord("R") and len(raw) >= 9]


class Conn:
    """A blocking socket where every read is bounded."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.received = b""
        self.closed_by_proxy = False
        self.half_closed = False

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
        except OSError:  # the proxy closed already (reset or broken pipe)
            self.closed_by_proxy = True
            return False
        return True

    def read_quiet(self, quiet: float = QUIET, until: float = 5.0) -> bytes:
        """What arrives until nothing came for ``quiet`` seconds, or EOF (bounded by ``until``)."""
        got = b""
        deadline = time.monotonic() + until
        while not self.closed_by_proxy and time.monotonic() < deadline:
            self.sock.settimeout(quiet)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                self.closed_by_proxy = True
                break
            if not chunk:
                self.closed_by_proxy = not self.half_closed
                break
            got += chunk
        self.received += got
        return got

    def read_until(self, kinds: bytes, within: float) -> bool:
        """Reads until a message of one of ``kinds`` arrives (True) or EOF (False); bounded."""
        deadline = time.monotonic() + within
        start = len(self.received)
        while True:
            try:
                msgs = split_backend(self.received[start:])
            except ProtocolBreach:
                msgs = []  # incomplete so far
            if any(kind in kinds for kind, _ in msgs):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no answer within {within}s (hang); got {self.received[start:]!r}"
                )
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                self.closed_by_proxy = True
                return False
            self.received += chunk

    def finish(self) -> None:
        """Half-closes our side; the proxy must close within CLOSE_WITHIN (no hang)."""
        if not self.closed_by_proxy:
            self.half_closed = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + CLOSE_WITHIN
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"the proxy kept the connection open {CLOSE_WITHIN}s after our EOF"
                    )
                self.sock.settimeout(left)
                try:
                    chunk = self.sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not chunk:
                    break
                self.received += chunk
        self.sock.close()


def verdict(
    proxy: ShopProxy, conn: Conn, name: str, *, silent_close_ok: bool, logged_in: bool
) -> None:
    """The checks every input must pass; records the outcome."""
    msgs = split_backend(conn.received)
    check_messages(msgs)
    if not logged_in:
        assert 0 not in auth_codes(msgs), f"logged in without a valid proof: {msgs!r}"
    if conn.closed_by_proxy:
        assert fatal(msgs) or silent_close_ok, (
            f"the proxy closed the connection without a FATAL error: {msgs!r}"
        )
        outcome = "FATAL + closed" if fatal(msgs) else "closed silently (cancel / Terminate)"
    elif any(kind == ord("E") for kind, _ in msgs):
        outcome = "ERROR, kept open"
    else:
        outcome = "kept open until our EOF"
    assert proxy.proc.poll() is None, f"guardproxy died (exit {proxy.proc.returncode})"
    tally = TALLY.setdefault(name, Tally())
    tally.inputs += 1
    tally.outcomes[outcome] += 1


def assert_log_clean(proxy: ShopProxy, since: int) -> None:
    log = proxy.log()[since:]
    assert "Traceback" not in log, f"unhandled exception in guardproxy:\n{log[-6000:]}"


@contextlib.contextmanager
def bounded_memory(proxy: ShopProxy, name: str) -> Iterator[None]:
    before = rss_kb(proxy.proc.pid)
    since = len(proxy.log())
    yield
    after = rss_kb(proxy.proc.pid)
    print(f"\n{name}: RSS {before} kB -> {after} kB")
    assert after - before < RSS_SLACK_KB, f"RSS grew by {after - before} kB over {name}"
    assert_log_clean(proxy, since)
    assert_still_serves(proxy)


def scram_login(port: int, agent: str = "support-fuzz") -> Conn:
    """A real SCRAM-SHA-256 login (scramp as the client), up to ReadyForQuery."""
    conn = Conn(port)
    try:
        _scram(conn, agent)
    except BaseException:
        conn.sock.close()
        raise
    conn.received = b""
    return conn


def _scram(conn: Conn, agent: str) -> None:
    conn.send(codec.build_startup({"user": agent, "database": shop.SHOP_DB}))
    assert conn.read_until(b"R", 5)
    client = scramp.ScramClient(["SCRAM-SHA-256"], agent, PASSWORD)
    conn.send(codec.build_sasl_initial("SCRAM-SHA-256", client.get_client_first().encode()))
    start = len(conn.received)
    assert conn.read_until(b"RE", 5)
    msgs = split_backend(conn.received[start:])
    kind, raw = msgs[-1]
    assert kind == ord("R") and codec.auth_code(raw) == 11, msgs
    client.set_server_first(raw[9:].decode())
    conn.send(codec.build_password(client.get_client_final().encode()))
    assert conn.read_until(b"ZE", 5)
    assert not fatal(split_backend(conn.received)), conn.received


def assert_still_serves(proxy: ShopProxy) -> None:
    conn = scram_login(proxy.port)
    conn.send(codec.build_query("SELECT id FROM orders WHERE id = 1"))
    assert conn.read_until(b"Z", 5)
    rows = [raw for kind, raw in split_backend(conn.received) if kind == ord("D")]
    assert rows and rows[0].endswith(b"1"), conn.received
    conn.send(codec.TERMINATE)
    conn.finish()


# ---------------------------------------------------------------- strategies: startup


def untyped(code: int, body: bytes) -> bytes:
    return struct.pack("!iI", 8 + len(body), code & 0xFFFFFFFF) + body


texts = st.text(max_size=24)
param_names = (
    st.sampled_from(
        [
            "user",
            "database",
            "options",
            "application_name",
            "client_encoding",
            "replication",
            "DateStyle",
            "_pq_.anything",
            "guard.task",
            "search_path",
        ]
    )
    | texts
)
param_values = (
    st.sampled_from(["support-fuzz", "analytics-fuzz", "nobody", "shop", "guardproxy", ""])
    | st.sampled_from(["-c statement_timeout=0", "-c role=postgres", "--search_path=evil", "-x"])
    | texts
)
codes = st.sampled_from(
    [
        3 << 16,
        (3 << 16) | 1,
        (3 << 16) | 2,
        2 << 16,
        1 << 16,
        4 << 16,
        codec.SSL_REQUEST,
        codec.GSSENC_REQUEST,
        codec.CANCEL_REQUEST,
        codec.RELAYED_CANCEL_REQUEST,
        1234 << 16 | 5680,
    ]
) | st.integers(0, 2**32 - 1)


@st.composite
def startup_packets(draw: st.DrawFn) -> bytes:
    params = draw(st.dictionaries(param_names, param_values, max_size=5))
    body = b"".join(codec.cstr(k) + codec.cstr(v) for k, v in params.items())
    if draw(st.booleans()):
        body += b"\x00"
    if draw(st.integers(0, 9)) == 0:
        body = draw(st.binary(max_size=64))  # a body of anything
    return untyped(draw(codes), body)


@st.composite
def mutated(draw: st.DrawFn, packets: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(packets))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "cut", "length", "junk", "double"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif op == "cut" and data:
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif op == "length" and len(data) >= 4:
            lengths = st.sampled_from([0, 3, 4, 7, 8, MAX_MESSAGE + 1, 2**31 - 1, -1, -(2**31)])
            data[0:4] = struct.pack("!i", draw(lengths | st.integers(-(2**31), 2**31 - 1)))
        elif op == "junk":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "double":
            data = data + bytes(data)
    return bytes(data)


startup_inputs = st.one_of(
    st.binary(max_size=256),
    mutated(startup_packets()),
    st.lists(
        st.sampled_from([untyped(codec.SSL_REQUEST, b""), untyped(codec.GSSENC_REQUEST, b"")])
        | startup_packets()
        | mutated(startup_packets()),
        min_size=2,
        max_size=4,
    ).map(b"".join),
)


# ---------------------------------------------------------------- strategies: SASL

b64ish = st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode())
gs2 = st.sampled_from(["n,,", "y,,", "p=tls-server-end-point,,", "n,a=support-fuzz,", "x,,", ""])
client_firsts = st.one_of(
    st.builds(
        lambda h, u, n: f"{h}n={u},r={n}", gs2, st.sampled_from(["", "*", "=2C"]) | texts, b64ish
    ),
    texts,
).map(lambda s: s.encode("utf-8", "surrogatepass")) | st.binary(max_size=96)
mechanisms = (
    st.sampled_from(["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS", "PLAIN", "", "SCRAM-SHA-1"]) | texts
)


@st.composite
def sasl_initials(draw: st.DrawFn) -> bytes:
    mech, first = draw(mechanisms), draw(client_firsts)
    choice = draw(st.integers(-3, 5))
    if choice < 0:  # a well-formed first message, so that the exchange reaches the proof
        nonce = draw(b64ish.filter(bool))
        return codec.build_sasl_initial("SCRAM-SHA-256", f"n,,n=,r={nonce}".encode())
    if choice <= 2:
        return codec.build_sasl_initial(mech, first)
    if choice == 3:  # the data length field lies
        body = codec.cstr(mech) + struct.pack("!i", draw(st.integers(-(2**31), 2**31 - 1))) + first
        return codec.message(b"p", body)
    if choice == 4:  # another message type at this point
        kind = draw(st.sampled_from(list(b"QPBXSpdf")) | st.integers(0, 255))
        return bytes([kind]) + struct.pack("!i", 4 + len(first)) + first
    return draw(mutated(st.just(codec.build_sasl_initial(mech, first))))


@st.composite
def sasl_finals(draw: st.DrawFn, server_first: str) -> bytes:
    nonce = dict(p.split("=", 1) for p in server_first.split(",") if "=" in p).get("r", "")
    proofs = st.builds(
        lambda cb, r, p: f"c={cb},r={r},p={p}",
        st.sampled_from(["biws", "eSws", "", "cD10bHMtc2VydmVyLWVuZC1wb2ludCws"]),
        st.sampled_from([nonce, nonce + "x", "", nonce[:-1]]),
        b64ish,
    ).map(str.encode)
    final = draw(proofs | st.binary(max_size=128))
    if draw(st.integers(0, 4)) == 0:
        return draw(mutated(st.just(codec.build_password(final))))
    return codec.build_password(final)


# ---------------------------------------------------------------- strategies: after login

SQL = [
    "SELECT id, fulfillment_status FROM orders WHERE id = 1",
    "SELECT * FROM payments",
    "SELECT 1; SELECT 2",
    "BEGIN",
    "ROLLBACK",
    "COMMIT",
    "SET guard.task = 'fuzz'",
    "SET statement_timeout = 0",
    "SET ROLE postgres",
    "COPY order_state_log (order_id, new_status, changed_by) FROM STDIN",
    "COPY (SELECT id FROM orders WHERE id < 3) TO STDOUT",
    "INSERT INTO order_state_log (order_id, new_status, changed_by) VALUES (1, 'packed', 'fuzz')",
    "/* idempotency_key='fuzz-1' */ INSERT INTO order_state_log (order_id, new_status, changed_by) VALUES (2, 'packed', 'fuzz')",
    "DELETE FROM orders",
    "LISTEN fuzz",
    "SELECT pg_sleep(30)",
    "DO $$ BEGIN PERFORM 1; END $$",
    "",
    ";",
    "SELECT '\u00e9\u2603'",
    "SELECT $1::int",
]
names = st.sampled_from([b"", b"s1", b"s2", b"gp_x"]) | st.binary(max_size=12)
queries = (
    st.sampled_from([s.encode() for s in SQL]) | texts.map(str.encode) | st.binary(max_size=64)
)
FRONTEND = sorted(codec.FRONTEND_TYPES)


def msg(kind: bytes, body: bytes) -> bytes:
    return codec.message(kind, body)


@st.composite
def frontend_messages(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(0, 11))
    if choice <= 2:
        return codec.build_query(draw(queries))
    if choice == 3:
        types = draw(st.lists(st.sampled_from([0, 23, 25, 2**31 - 1]), max_size=3))
        tail = struct.pack("!h", len(types)) + b"".join(struct.pack("!i", t) for t in types)
        if draw(st.booleans()):
            tail = draw(st.binary(max_size=12))
        return msg(b"P", draw(names) + b"\x00" + draw(queries) + b"\x00" + tail)
    if choice == 4:
        return msg(
            b"B", draw(names) + b"\x00" + draw(names) + b"\x00" + draw(st.binary(max_size=40))
        )
    if choice == 5:
        return msg(
            draw(st.sampled_from([b"D", b"C"])),
            draw(st.sampled_from([b"S", b"P", b"X"])) + draw(names) + b"\x00",
        )
    if choice == 6:
        return msg(b"E", draw(names) + b"\x00" + struct.pack("!i", draw(st.integers(-5, 5))))
    if choice == 7:
        return draw(st.sampled_from([codec.SYNC, msg(b"H", b""), msg(b"c", b""), msg(b"X", b"")]))
    if choice == 8:
        return msg(draw(st.sampled_from([b"d", b"f"])), draw(st.binary(max_size=64)))
    if choice == 9:  # FunctionCall, or any frontend type with a body of anything
        kind = draw(st.sampled_from(FRONTEND))
        return bytes([kind]) + struct.pack("!i", 4 + 8) + draw(st.binary(min_size=8, max_size=8))
    if choice == 10:  # a type no frontend sends
        kind = draw(st.integers(0, 255).filter(lambda k: k not in codec.FRONTEND_TYPES))
        return bytes([kind]) + struct.pack("!i", 4)
    return draw(mutated(st.just(codec.build_query(draw(queries)))))


tails = st.sampled_from(["none", "sync", "cut", "huge", "tiny", "oversize-body"])


# ---------------------------------------------------------------- the fuzzers


def one_startup_input(proxy: ShopProxy, data: bytes) -> None:
    conn = Conn(proxy.port)
    try:
        conn.send(data)
        conn.read_quiet()
        conn.finish()
    finally:
        conn.sock.close()
    silent_ok = CANCEL in data or RELAYED_CANCEL in data
    verdict(proxy, conn, "startup", silent_close_ok=silent_ok, logged_in=False)


def one_scram_exchange(proxy: ShopProxy, user: str, data: st.DataObject) -> None:
    conn = Conn(proxy.port)
    stage = "scram (first message)"
    try:
        conn.send(codec.build_startup({"user": user, "database": shop.SHOP_DB}))
        assert conn.read_until(b"RE", 5)
        if conn.send(data.draw(sasl_initials(), label="SASLInitialResponse")):
            start = len(conn.received)
            conn.read_quiet()
            msgs = split_backend(conn.received[start:])
            first = [raw for kind, raw in msgs if kind == ord("R") and codec.auth_code(raw) == 11]
            if first and not conn.closed_by_proxy:
                server_first = first[0][9:].decode(errors="replace")
                conn.send(data.draw(sasl_finals(server_first), label="SASLResponse"))
                conn.read_quiet()
                stage = "scram (to the proof)"
        conn.finish()
    finally:
        conn.sock.close()
    verdict(proxy, conn, stage, silent_close_ok=False, logged_in=False)


def one_message_stream(
    proxy: ShopProxy, messages: list[bytes], tail: str, data: st.DataObject
) -> None:
    agent = data.draw(st.sampled_from(AGENTS), label="agent")
    stream = b"".join(messages)
    if tail == "sync":
        stream += codec.SYNC
    elif tail == "cut":  # a message cut short: the proxy must wait for the rest, then see EOF
        whole = data.draw(frontend_messages().filter(lambda m: len(m) > 1), label="cut message")
        stream += whole[: data.draw(st.integers(1, len(whole) - 1), label="cut at")]
    elif tail == "huge":
        stream += b"Q" + struct.pack("!i", data.draw(st.sampled_from([MAX_MESSAGE + 1, 2**31 - 1])))
    elif tail == "tiny":
        stream += b"Q" + struct.pack("!i", data.draw(st.integers(-(2**31), 3), label="length"))
    elif tail == "oversize-body":
        stream += codec.build_query(b"SELECT '" + b"x" * (MAX_MESSAGE + 10) + b"'")
    framing, terminated = frame(stream)
    conn = scram_login(proxy.port, agent)  # every draw is done: nothing aborts the example now
    try:
        conn.send(stream)
        conn.read_quiet()
        # still open after whole messages: it must still answer (or close), never sit there
        if (
            framing == "whole"
            and not conn.closed_by_proxy
            and conn.send(codec.SYNC + codec.build_query("SELECT 1"))
        ):
            conn.read_until(b"Z", PROBE_WITHIN)
        conn.finish()
    finally:
        conn.sock.close()
    if framing == "bad length" and not terminated:
        assert conn.closed_by_proxy and fatal(split_backend(conn.received)), (
            f"a bad message length must end the connection with FATAL: {conn.received[-300:]!r}"
        )
    verdict(proxy, conn, "after login", silent_close_ok=terminated, logged_in=True)


def frame(stream: bytes) -> tuple[str, bool]:
    """How the proxy must frame ``stream``: ``whole`` messages, ``cut`` (it waits for the
    rest) or a ``bad length`` (it must refuse); and whether a Terminate comes first."""
    pos, terminated = 0, False
    while pos < len(stream):
        if len(stream) - pos < 5:
            return "cut", terminated
        (length,) = struct.unpack_from("!i", stream, pos + 1)
        if length < 4 or length > MAX_MESSAGE:
            return "bad length", terminated
        if pos + 1 + length > len(stream):
            return "cut", terminated
        terminated = terminated or stream[pos] == ord("X")
        pos += 1 + length
    return "whole", terminated


FOUND_STREAMS = [
    # two managed writes and an empty query pipelined in one go: the server was given
    # back to the pool while the second write still needed it (a hang)
    [
        codec.build_query(
            "/* idempotency_key='fuzz-1' */ INSERT INTO order_state_log "
            "(order_id, new_status, changed_by) VALUES (2, 'packed', 'fuzz')"
        )
    ]
    * 2
    + [codec.build_query("")],
]


@pytest.mark.parametrize("messages", FOUND_STREAMS)
def test_streams_the_fuzzer_found_are_answered(
    fuzz_proxy: ShopProxy, messages: list[bytes]
) -> None:
    conn = scram_login(fuzz_proxy.port)
    start = len(conn.received)
    try:
        # every Query and the Sync get their ReadyForQuery, then a probe is served too
        conn.send(b"".join(messages) + codec.SYNC + codec.build_query("SELECT 1"))
        deadline = time.monotonic() + PROBE_WITHIN
        while time.monotonic() < deadline:
            conn.read_quiet()
            answers = split_backend(conn.received[start:])
            if sum(1 for kind, _ in answers if kind == ord("Z")) >= len(messages) + 2:
                break
        answers = split_backend(conn.received[start:])
        assert sum(1 for kind, _ in answers if kind == ord("Z")) == len(messages) + 2, answers
        assert answers[-3][0] == ord("D") and answers[-3][1].endswith(b"1"), answers
    finally:
        conn.sock.close()


def test_fuzz_startup_path_never_crashes_hangs_or_logs_anyone_in(fuzz_proxy: ShopProxy) -> None:
    @fuzz_settings(250)
    @given(data=startup_inputs)
    def fuzz(data: bytes) -> None:
        one_startup_input(fuzz_proxy, data)

    with bounded_memory(fuzz_proxy, "startup fuzz"):
        fuzz()


def test_fuzz_scram_exchange_never_crashes_hangs_or_logs_anyone_in(fuzz_proxy: ShopProxy) -> None:
    @fuzz_settings(150)
    @given(user=st.sampled_from([*AGENTS, "nobody-fuzz", "support-unknown"]), data=st.data())
    def fuzz(user: str, data: st.DataObject) -> None:
        one_scram_exchange(fuzz_proxy, user, data)

    with bounded_memory(fuzz_proxy, "SCRAM fuzz"):
        fuzz()


def test_fuzz_messages_after_login_never_crash_or_hang_the_proxy(fuzz_proxy: ShopProxy) -> None:
    @fuzz_settings(200)
    @given(
        messages=st.lists(frontend_messages(), min_size=1, max_size=6), tail=tails, data=st.data()
    )
    def fuzz(messages: list[bytes], tail: str, data: st.DataObject) -> None:
        one_message_stream(fuzz_proxy, messages, tail, data)

    with bounded_memory(fuzz_proxy, "message fuzz"):
        fuzz()


# ---------------------------------------------------------------- memory


HOSTILE = [
    untyped(3 << 16, b"user\x00support-fuzz\x00database\x00shop"),  # no final NUL
    struct.pack("!i", MAX_MESSAGE + 1) + b"\x00\x03\x00\x00",
    untyped(2 << 16, b"\x00" * 292),
    untyped(codec.SSL_REQUEST, b"") + untyped(codec.SSL_REQUEST, b""),
    b"\x00\x00\x00\x03",
]


BATCH = 250


def test_memory_stays_flat_over_a_thousand_hostile_connections(fuzz_proxy: ShopProxy) -> None:
    """Three equal batches of hostile connections (bad packets, failed SCRAM logins with
    new agent ids, garbage after login); the third grows RSS no more than a little."""

    def batch(n: int, offset: int) -> None:
        for i in range(n):
            which = i % 7
            if which < len(HOSTILE):
                conn = Conn(fuzz_proxy.port)
                conn.send(HOSTILE[which])
                conn.read_quiet(0.05)
                conn.finish()
            elif which == 5:  # a failed SCRAM login for an agent id never seen before
                conn = Conn(fuzz_proxy.port)
                conn.send(
                    codec.build_startup({"user": f"support-x{offset + i}", "database": "shop"})
                )
                conn.read_until(b"RE", 5)
                conn.send(codec.build_sasl_initial("SCRAM-SHA-256", b"n,,n=,r=abcdefghijkl"))
                conn.read_quiet(0.05)
                conn.send(codec.build_password(b"c=biws,r=abcdefghijkl,p=AAAA"))
                conn.read_quiet(0.05)
                conn.finish()
            else:  # logged in, then a stream of junk
                conn = scram_login(fuzz_proxy.port)
                conn.send(codec.build_query("SELECT 1") + b"\xff\x00\x00\x00\x08junk")
                conn.read_quiet(0.05)
                conn.finish()
            assert fuzz_proxy.proc.poll() is None

    since = len(fuzz_proxy.log())
    batch(BATCH, 0)  # warm-up: caches, allocator pools
    warm = rss_kb(fuzz_proxy.proc.pid)
    batch(BATCH, BATCH)
    middle = rss_kb(fuzz_proxy.proc.pid)
    batch(BATCH, 2 * BATCH)
    end = rss_kb(fuzz_proxy.proc.pid)
    print(
        f"\nMEMORY FIGURES: {3 * BATCH} hostile connections; RSS after each {BATCH}: "
        f"{warm}, {middle}, {end} kB"
    )
    TALLY.setdefault("memory flood", Tally()).inputs += 3 * BATCH
    assert end - warm < 16 * 1024, f"RSS keeps growing: {warm} -> {middle} -> {end} kB"
    assert_log_clean(fuzz_proxy, since)
    assert_still_serves(fuzz_proxy)


def test_fuzzers_left_the_proxy_serving_with_bounded_memory(fuzz_proxy: ShopProxy) -> None:
    """Runs last in this module: the proxy that took every input above still serves."""
    assert fuzz_proxy.proc.poll() is None
    assert_log_clean(fuzz_proxy, 0)
    assert_still_serves(fuzz_proxy)
