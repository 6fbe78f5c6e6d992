"""Bad input gets a clear error and loses nothing (issue 2), over raw sockets.

Every test sends something a well-behaved client would not, then checks what
came back on the wire, that the proxy closed only that client, that nothing
was left open in Postgres, that other clients keep working, that the proxy
process is still alive and that its log has one line about the event.

The tests share a few proxies per module (``shared``; ``single`` with one server
connection), so each fault also proves the same process keeps serving after all
the faults before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import scramp
from conftest import wait_until
from pgcluster import PgCluster
from wirekit import (
    Msg,
    WireClient,
    data_rows,
    deadline_for,
    errors_in,
    eventually,
    fatal_in,
    launched_proxy,
    log_lines_about,
    startup_packet,
    untyped,
    v2_startup_packet,
)

from guardproxy.protocol import codec
from guardproxy.protocol.scram import write_verifier

WAIT = 10.0


@pytest.fixture(scope="module")
def shared(pg, tmp_path_factory):
    """One proxy for the tests whose fault only concerns their own client."""
    with launched_proxy(pg, tmp_path_factory.mktemp("shared"), max_message_size=1024) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def single(pg, tmp_path_factory):
    """pool_size 1: a server left dirty by one test would be the next test's server."""
    with launched_proxy(
        pg, tmp_path_factory.mktemp("single"), max_message_size=1024, pool_size=1
    ) as proxy:
        yield proxy


# where each shared proxy's log stood when the current test began
LOG_START: dict[int, int] = {}


@pytest.fixture(autouse=True)
def _deadline(request: pytest.FixtureRequest) -> Iterator[None]:
    names = [n for n in ("shared", "single", "scram_proxy") if n in request.fixturenames]
    proxies = [request.getfixturevalue(n) for n in names]
    for proxy in proxies:
        LOG_START[proxy.port] = len(proxy.log())
    with deadline_for(proxies, request.node):
        yield


def this_tests_log(proxy) -> str:
    return proxy.log()[LOG_START.get(proxy.port, 0) :]


@pytest.fixture
def table(pg: PgCluster) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:10]}"
    pg.psql(f"CREATE TABLE {name} (id int PRIMARY KEY, note text)", user="app_owner")
    yield name
    # A failed test may leave a transaction holding the table until its proxy stops: do not wait.
    with contextlib.suppress(RuntimeError):
        pg.psql(f"SET lock_timeout = '1s'; DROP TABLE IF EXISTS {name}", user="app_owner")


def count_rows(pg: PgCluster, table: str) -> int:
    return int(pg.psql(f"SELECT count(*) FROM {table}"))


def lock_free(pg: PgCluster, table: str) -> bool:
    """True when no session holds any lock on ``table`` (no open transaction or COPY on it)."""
    try:
        pg.psql(f"BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE NOWAIT; COMMIT")
    except RuntimeError:
        return False
    return True


def stuck_backends(pg: PgCluster) -> str:
    """app_owner backends left inside a transaction or a COPY."""
    return pg.psql(
        "SELECT string_agg(pid || ' ' || state || ' ' || left(query, 40), '; ') "
        "FROM pg_stat_activity WHERE usename = 'app_owner' AND backend_type = 'client backend' "
        "AND (state LIKE 'idle in transaction%' OR (state = 'active' AND query ILIKE 'copy%'))"
    )


async def assert_one_log_line(proxy, client_port: int) -> None:
    await eventually(
        lambda: log_lines_about(this_tests_log(proxy), client_port),
        5,
        f"a log line about client port {client_port}",
    )
    await asyncio.sleep(0.3)  # give a second line the chance to show up, if there is one
    lines = log_lines_about(this_tests_log(proxy), client_port)
    assert len(lines) == 1, f"expected one log line about the client, got {lines}"


def assert_no_warning_about(proxy, client_port: int) -> None:
    noisy = [
        line
        for line in log_lines_about(this_tests_log(proxy), client_port)
        if " WARNING " in line or " ERROR " in line
    ]
    assert noisy == []


def assert_serves(proxy, marker: str = "still here") -> None:
    """A brand-new client logs in and reads a value back."""
    with psycopg.connect(proxy.dsn("newcomer"), autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT %s::text", (marker,)).fetchone() == (marker,)


async def expect_fatal(client: WireClient) -> dict[str, str]:
    """The proxy answers with one FATAL ErrorResponse and closes the connection."""
    msgs = await client.read_until_eof(WAIT)
    return fatal_in(msgs)


# ---------------------------------------------------------------- oversize, malformed


async def test_oversize_message_is_fatal_for_that_client_only(shared, pg, table) -> None:
    proxy = shared
    bystander = psycopg.connect(proxy.dsn("bystander"), connect_timeout=10)
    try:
        bystander.execute(f"INSERT INTO {table} VALUES (1, 'before')")  # transaction stays open
        async with await WireClient.connect(proxy.port) as raw:
            await raw.login()
            await raw.send(codec.build_query("SELECT '" + "x" * 4000 + "'"))
            fatal = await expect_fatal(raw)
            assert fatal["C"] in ("08P01", "54000")
            assert "1024" in fatal["M"], fatal
        # the bystander's transaction went on undisturbed and commits both rows
        bystander.execute(f"INSERT INTO {table} VALUES (2, 'after')")
        bystander.commit()
    finally:
        bystander.close()
    assert pg.psql(f"SELECT string_agg(note, ',' ORDER BY id) FROM {table}") == "before,after"
    assert_serves(proxy)
    assert proxy.alive()
    await assert_one_log_line(proxy, raw.local_port)


async def test_oversize_message_inside_a_transaction_rolls_it_back(single, pg, table) -> None:
    proxy = single
    async with await WireClient.connect(proxy.port) as raw:
        await raw.login()
        assert not errors_in(await raw.query("BEGIN"))
        assert not errors_in(await raw.query(f"INSERT INTO {table} VALUES (1, 'doomed')"))
        await raw.send(codec.build_query("SELECT '" + "y" * 2000 + "'"))
        assert (await expect_fatal(raw))["C"] in ("08P01", "54000")
    await eventually(lambda: lock_free(pg, table), WAIT, "the open transaction to end")
    assert count_rows(pg, table) == 0
    assert stuck_backends(pg) == ""
    assert_serves(proxy)  # pool_size 1: the one server came back (or a fresh one was opened)
    assert proxy.alive()
    await assert_one_log_line(proxy, raw.local_port)


@pytest.mark.parametrize("whole", [True, False], ids=["whole-packet", "header-only"])
async def test_oversize_startup_packet_is_fatal(shared, whole: bool) -> None:
    proxy = shared
    packet = startup_packet({"user": "agent-1", "application_name": "z" * 3000})
    async with await WireClient.connect(proxy.port) as raw:
        await raw.send(packet if whole else packet[:8])
        fatal = await expect_fatal(raw)
        assert fatal["C"] == "08P01"
        assert "max_message_size" in fatal["M"] or str(len(packet)) in fatal["M"], fatal
    assert_serves(proxy)
    assert proxy.alive()
    await assert_one_log_line(proxy, raw.local_port)


@pytest.mark.parametrize("length", [0, 3])
async def test_message_length_below_four_is_fatal(shared, length: int) -> None:
    proxy = shared
    async with await WireClient.connect(proxy.port) as raw:
        await raw.login()
        await raw.send(b"Q" + struct.pack("!i", length) + b"select 1\x00")
        fatal = await expect_fatal(raw)
        assert fatal["C"] == "08P01"
        assert str(length) in fatal["M"]
    assert_serves(proxy)
    assert proxy.alive()
    await assert_one_log_line(proxy, raw.local_port)


@pytest.mark.parametrize(
    ("message", "what"),
    [
        (codec.message(b"Q", b"select 1"), "Query without its terminating NUL"),
        (codec.message(b"P", b"\x00select 1\x00" + struct.pack("!h", 3)), "Parse, 3 OIDs missing"),
        (codec.message(b"P", b"named\x00select 1\x00" + struct.pack("!h", 1)), "named Parse"),
        (codec.message(b"B", b"portal"), "Bind cut short"),
        (codec.message(b"D", b"Xname\x00"), "Describe of neither S nor P"),
    ],
    ids=["query-no-nul", "parse-oids", "parse-named", "bind-short", "describe-target"],
)
async def test_malformed_message_is_fatal(shared, message: bytes, what: str) -> None:
    proxy = shared
    async with await WireClient.connect(proxy.port) as raw:
        await raw.login()
        await raw.send(message)
        fatal = await expect_fatal(raw)
        assert fatal["C"] == "08P01", (what, fatal)
    assert_serves(proxy)
    assert proxy.alive()
    await assert_one_log_line(proxy, raw.local_port)


async def test_unknown_message_type_is_fatal_and_rolls_back(shared, pg, table) -> None:
    proxy = shared
    with psycopg.connect(proxy.dsn("bystander"), autocommit=True, connect_timeout=10) as other:
        other.execute("SELECT 1")
        async with await WireClient.connect(proxy.port) as raw:
            await raw.login()
            assert not errors_in(await raw.query("BEGIN"))
            assert not errors_in(await raw.query(f"INSERT INTO {table} VALUES (1, 'doomed')"))
            await raw.send(codec.message(b"z", b"whatever"))
            fatal = await expect_fatal(raw)
            assert fatal["C"] == "08P01"
            assert "'z'" in fatal["M"], fatal
        assert other.execute("SELECT 'bystander ok'").fetchone() == ("bystander ok",)
    await eventually(lambda: lock_free(pg, table), WAIT, "the open transaction to end")
    assert count_rows(pg, table) == 0
    assert stuck_backends(pg) == ""
    assert proxy.alive()
    await assert_one_log_line(proxy, raw.local_port)


async def test_unknown_message_type_is_fatal_at_once_even_with_no_server_free(
    single, pg, table
) -> None:
    proxy = single
    async with await WireClient.connect(proxy.port) as raw:
        await raw.login()
        with psycopg.connect(proxy.dsn("holder"), connect_timeout=10) as holder:
            holder.execute(f"INSERT INTO {table} VALUES (1, 'held')")  # the only server, held
            await raw.send(codec.message(b"z"))
            fatal = await expect_fatal(raw)  # not queued behind the holder for a server
            assert fatal["C"] == "08P01"
            holder.commit()
    assert count_rows(pg, table) == 1
    assert_serves(proxy)
    assert proxy.alive()
    await assert_one_log_line(proxy, raw.local_port)


# ---------------------------------------------------------------- startup packets


@pytest.mark.parametrize(
    ("major", "minor"), [(2, 0), (4, 0), (1234, 5681)], ids=["2.0", "4.0", "1234.5681"]
)
async def test_unsupported_protocol_version_is_fatal_naming_it(
    shared, major: int, minor: int
) -> None:
    proxy = shared
    async with await WireClient.connect(proxy.port) as raw:
        if major == 2:
            await raw.send(v2_startup_packet("agent-1", "app"))
        else:
            await raw.send(startup_packet({"user": "agent-1", "database": "app"}, major, minor))
        fatal = await expect_fatal(raw)
        assert fatal["C"] in ("08P01", "0A000")
        assert f"{major}.{minor}" in fatal["M"], fatal
        assert "3.0" in fatal["M"]  # what is supported
    assert_serves(proxy)
    assert proxy.alive()
    await assert_one_log_line(proxy, raw.local_port)


async def test_startup_with_cancel_code_1234_5678_but_a_startup_body_is_fatal(shared) -> None:
    # 1234.5678 is the CancelRequest code: a longer packet with it is a malformed cancel.
    proxy = shared
    async with await WireClient.connect(proxy.port) as raw:
        await raw.send(startup_packet({"user": "agent-1", "database": "app"}, 1234, 5678))
        fatal = await expect_fatal(raw)
        assert fatal["C"] == "08P01"
        assert "CancelRequest" in fatal["M"]
    assert_serves(proxy)
    assert proxy.alive()
    await assert_one_log_line(proxy, raw.local_port)


async def test_cancel_request_for_nobody_is_closed_silently(shared) -> None:
    proxy = shared
    async with await WireClient.connect(proxy.port) as raw:
        await raw.send(codec.build_cancel(12345, 67890))
        assert await raw.read_until_eof(WAIT) == []  # Postgres never answers a cancel either
    assert_serves(proxy)
    assert proxy.alive()


async def test_wrong_database_is_fatal_3d000_naming_the_one_to_use(shared) -> None:
    proxy = shared
    async with await WireClient.connect(proxy.port) as raw:
        await raw.send(startup_packet({"user": "agent-1", "database": "nope"}))
        fatal = await expect_fatal(raw)
        assert fatal["C"] == "3D000"
        assert '"nope"' in fatal["M"]
        assert "app" in fatal.get("H", "") + fatal["M"], fatal
    assert_serves(proxy)
    assert proxy.alive()
    await assert_one_log_line(proxy, raw.local_port)


@pytest.mark.parametrize(
    "requests",
    [[codec.SSL_REQUEST], [codec.GSSENC_REQUEST], [codec.GSSENC_REQUEST, codec.SSL_REQUEST]],
    ids=["ssl", "gssenc", "gssenc-then-ssl"],
)
async def test_encryption_requests_answered_n_then_login_works(shared, requests) -> None:
    proxy = shared
    async with await WireClient.connect(proxy.port) as raw:
        for code in requests:
            await raw.send(untyped(code))
            assert await raw.read_byte() == b"N"
        await raw.login()
        assert await raw.scalar("SELECT 'plain text it is'") == "plain text it is"
    assert proxy.alive()
    assert_no_warning_about(proxy, raw.local_port)


@pytest.mark.parametrize("options", [{}, {"_pq_.future_feature": "on"}], ids=["3.2", "3.2+_pq_"])
async def test_protocol_3_2_is_negotiated_down_to_3_0(shared, options) -> None:
    proxy = shared
    async with await WireClient.connect(proxy.port) as raw:
        msgs = await raw.login(minor=2, extra=options)
        kinds = [m.kind for m in msgs]
        assert kinds[0] == b"v", kinds  # before any authentication message
        newest, count = struct.unpack_from("!ii", msgs[0].raw, 5)
        assert (newest >> 16 in (0, 3), newest & 0xFFFF) == (True, 0)  # 3.0 (or minor 0)
        assert count == len(options)
        assert msgs[0].raw[13:] == b"".join(codec.cstr(k) for k in options)
        assert b"R" in kinds and kinds[-1] == b"Z"
        assert await raw.scalar("SELECT 'negotiated'") == "negotiated"
        assert raw.backend_key is not None
    assert proxy.alive()
    assert_no_warning_about(proxy, raw.local_port)


# ---------------------------------------------------------------- clients that vanish


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_disconnect_mid_message_inside_a_transaction(single, pg, table, how) -> None:
    proxy = single
    with psycopg.connect(proxy.dsn("bystander"), autocommit=True, connect_timeout=10) as other:
        other.execute("SELECT 1")
        async with await WireClient.connect(proxy.port) as raw:
            await raw.login()
            assert not errors_in(await raw.query("BEGIN"))
            assert not errors_in(await raw.query(f"INSERT INTO {table} VALUES (1, 'lost')"))
            await raw.send(b"Q" + struct.pack("!i", 200) + b"SELECT 'half a mess")
            await (raw.abort() if how == "reset" else raw.close())
        await eventually(lambda: lock_free(pg, table), WAIT, "the open transaction to end")
        assert count_rows(pg, table) == 0
        assert stuck_backends(pg) == ""
        # pool_size 1: the bystander can only get a server if it came back clean
        row = other.execute(
            "SELECT now() = statement_timestamp(), pg_current_xact_id_if_assigned() IS NULL, "
            f"(SELECT count(*) FROM {table})"
        ).fetchone()
        assert row == (True, True, 0)
    assert proxy.alive()
    await assert_one_log_line(proxy, raw.local_port)


@pytest.mark.parametrize("how", ["close", "reset", "mid-copydata"])
async def test_disconnect_mid_copy(single, pg, table, how) -> None:
    proxy = single
    with psycopg.connect(proxy.dsn("bystander"), autocommit=True, connect_timeout=10) as other:
        other.execute("SELECT 1")
        async with await WireClient.connect(proxy.port) as raw:
            await raw.login()
            await raw.send(codec.build_query(f"COPY {table} FROM STDIN"))
            msgs = await raw.read_until(b"GZ")
            assert msgs[-1].kind == b"G", errors_in(msgs)
            await raw.send(codec.message(b"d", b"1\tcopied\n2\tcopied\n"))
            if how == "mid-copydata":
                await raw.send(b"d" + struct.pack("!i", 1000) + b"3\tcut")
            await (raw.abort() if how == "reset" else raw.close())
        await eventually(lambda: lock_free(pg, table), WAIT, "the COPY to end")
        assert stuck_backends(pg) == ""
        assert count_rows(pg, table) == 0
        row = other.execute(
            "SELECT now() = statement_timestamp(), pg_current_xact_id_if_assigned() IS NULL, "
            f"(SELECT count(*) FROM {table})"
        ).fetchone()
        assert row == (True, True, 0)
        other.execute(f"INSERT INTO {table} VALUES (9, 'works')")
    assert pg.psql(f"SELECT note FROM {table}") == "works"
    assert proxy.alive()
    await assert_one_log_line(proxy, raw.local_port)


async def test_client_gone_during_login_does_not_disturb_others(shared) -> None:
    proxy = shared
    with psycopg.connect(proxy.dsn("bystander"), autocommit=True, connect_timeout=10) as other:
        packet = startup_packet({"user": "agent-1", "database": "app"})
        for i in range(5):
            async with await WireClient.connect(proxy.port) as c:
                await c.send(packet[: 3 + i * 5])  # cut at different places, even in the length
                await c.abort()
        assert other.execute("SELECT 'fine'").fetchone() == ("fine",)
    assert_serves(proxy)
    assert proxy.alive()


# ---------------------------------------------------------------- authentication


@pytest.fixture(scope="module")
def scram_proxy(pg, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("scram")
    auth_file = tmp_path / "agents.auth"
    write_verifier(auth_file, "agent-1", "agent-pw")
    # A verifier exactly as Postgres stores it in pg_authid must work too.
    rolpassword = pg.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'app_owner'")
    with auth_file.open("a") as f:
        f.write(f"agent-pg:{rolpassword}\n")
    with launched_proxy(pg, tmp_path, auth_mode="scram", auth_file=auth_file) as proxy:
        yield proxy


async def scram_login(proxy, agent: str, password: str) -> list[Msg]:
    """SCRAM through a raw socket with scramp as the client; what came after the proof."""
    async with await WireClient.connect(proxy.port) as raw:
        await raw.send(startup_packet({"user": agent, "database": "app"}))
        msg = await raw.read_message()
        assert msg.kind == b"R" and codec.auth_code(msg.raw) == 10
        client = scramp.ScramClient(["SCRAM-SHA-256"], agent, password)
        first = client.get_client_first().encode()
        await raw.send(codec.build_sasl_initial("SCRAM-SHA-256", first))
        msg = await raw.read_message()
        assert msg.kind == b"R" and codec.auth_code(msg.raw) == 11, errors_in([msg])
        client.set_server_first(msg.raw[9:].decode())
        await raw.send(codec.build_password(client.get_client_final().encode()))
        msgs = await raw.read_until(b"ZE")
        if msgs[-1].kind == b"E":
            return msgs + await raw.read_until_eof(WAIT)
        final = next(m for m in msgs if m.kind == b"R" and codec.auth_code(m.raw) == 12)
        client.set_server_final(final.raw[9:].decode())  # the proxy proved it knows the verifier
        await raw.send(codec.build_query("SELECT current_user"))
        return msgs + await raw.read_until(b"Z")


async def test_scram_wrong_password_and_unknown_agent_fail_alike(scram_proxy) -> None:
    ok = await scram_login(scram_proxy, "agent-1", "agent-pw")
    assert data_rows(ok) == [["app_owner"]]
    from_pg = await scram_login(scram_proxy, "agent-pg", "app_pw")
    assert data_rows(from_pg) == [["app_owner"]]

    wrong = fatal_in(await scram_login(scram_proxy, "agent-1", "not-it"))
    unknown = fatal_in(await scram_login(scram_proxy, "ghost", "not-it"))
    assert wrong["C"] == unknown["C"] == "28P01"
    assert wrong["M"].replace("agent-1", "X") == unknown["M"].replace("ghost", "X")
    assert wrong.get("H") == unknown.get("H")
    assert scram_proxy.alive()
    wait_until(lambda: "ghost" in scram_proxy.log(), 5, "the failed login in the log")


def test_scram_login_with_libpq(scram_proxy) -> None:
    """psycopg (libpq) sends an empty SCRAM user name (n=,), as it does to Postgres."""
    for agent, password in (("agent-1", "agent-pw"), ("agent-pg", "app_pw")):
        with psycopg.connect(scram_proxy.dsn(agent, password), connect_timeout=10) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("app_owner",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(scram_proxy.dsn("agent-1", "not-it"), connect_timeout=10)


async def test_rows_read_back_through_raw_client(shared, pg, table) -> None:
    """The raw client itself is trustworthy: what it inserts, Postgres has."""
    proxy = shared
    async with await WireClient.connect(proxy.port) as raw:
        await raw.login()
        assert not errors_in(await raw.query(f"INSERT INTO {table} VALUES (7, 'raw')"))
        rows = data_rows(await raw.query(f"SELECT id, note FROM {table}"))
    assert rows == [["7", "raw"]]
    assert pg.psql(f"SELECT note FROM {table} WHERE id = 7") == "raw"
