"""One client connection: login, then messages relayed to a lent server connection.

In transaction mode a server is borrowed when the client sends something and
given back on ReadyForQuery idle with nothing pending. What a client set up
on the server it had before is made to exist on the next one:

* session settings (SET, startup parameters) are read back from the server
  when a statement changed them and replayed on the next server;
* named prepared statements get a server-side name derived from their text
  (``gp_<hash>``) and are prepared on each server on first use, invisibly.

Features that live in one backend (LISTEN, temp tables, session advisory locks,
WITH HOLD cursors, SQL-level PREPARE, LOAD) pin the client to its server.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import re
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

import pglast

from guardproxy.guard.sqltext import app_name_sql, raise_sql, replay_sql
from guardproxy.metrics import AgentStats
from guardproxy.pool.server import (
    BIND,
    CLOSE,
    DESCRIBE,
    EXECUTE,
    KEEP_ERROR_ONLY,
    PARSE,
    QUERY,
    SYNC,
    SYNTH,
    ServerConn,
    begin_batch,
    end_batch,
)
from guardproxy.protocol import codec
from guardproxy.protocol.errors import GuardError, ProtocolViolation, UpstreamError
from guardproxy.server.guard import LocalAnswer, SessionGuard
from guardproxy.server.login import run_login
from guardproxy.server.managed import SessionWrites
from guardproxy.server.plancheck import PlanChecks
from guardproxy.server.tls import peer_common_name

if TYPE_CHECKING:
    from collections.abc import Iterable

    from guardproxy.server.app import Proxy

log = logging.getLogger("guardproxy.session")

# Statements whose effect outlives the transaction in one backend. False
# positives only cost pooling efficiency, never correctness.
# Searched in lower-cased text: a case-sensitive pattern lets the regex engine skip
# ahead by first character, several times faster than (?i) on every statement.
_PIN_RE = re.compile(
    rb"\b(?:listen|temp(?:orary)?|pg_(?:try_)?advisory_lock(?:_shared)?|hold|prepare|load)\b"
)
_ROW_RETURNING = frozenset((b"SELECT", b"FETCH", b"COPY", b"MOVE"))
_SETTINGS_TAGS = frozenset((b"SET", b"RESET", b"DISCARD ALL"))
_PIN_TAGS = frozenset((b"LISTEN",))
_FORGET_PREPARED_TAGS = frozenset((b"DISCARD ALL", b"DEALLOCATE ALL"))
CAPTURE_SETTINGS = (
    "SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session' ORDER BY name"
)

Settings = tuple[tuple[str, str], ...]
NO_SUCH_STATEMENT = b"guardproxy_no_unnamed_statement"
NOT_PREPARED_BY_CLIENT = b"guardproxy_not_prepared_by_this_client"


_generations = itertools.count(1)


def server_statement_name(query: bytes, param_types: bytes, search_path: str = "") -> bytes:
    # search_path is part of what the text means: the same text under another
    # path is another statement (schema-per-tenant), so it gets another name.
    return (
        b"gp_"
        + hashlib.blake2b(
            query + b"\x00" + param_types + b"\x00" + search_path.encode(), digest_size=20
        )
        .hexdigest()
        .encode()
    )


def syntax_error(query: bytes) -> GuardError | None:
    """The Postgres parser's verdict on ``query`` (pglast wraps the server's own parser)."""
    try:
        pglast.parser.split(query.decode(errors="replace"))
    except pglast.parser.ParseError as exc:
        return GuardError(f"{exc.args[0]}", sqlstate="42601")
    return None


class ClientSession(asyncio.Protocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.pool = proxy.pool
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.agent_id = ""
        self.reader = codec.MessageReader(proxy.settings.max_message_size)
        self.server: ServerConn | None = None
        self.logged_in = False
        self.closed = False
        self.blocked = False  # waiting for a server or for settings to be read back
        self.held: tuple[int, bytes] | None = None  # judged, waiting for a server
        self.guard: SessionGuard | None = None
        self.writes = SessionWrites(self)
        self.plans = PlanChecks(self)
        self.row_cap: tuple[int, bool] | None = None  # of the last judged Query
        self.cursor: tuple[str, str] | None = None  # the capped FETCH / DECLARE it is
        self.statement_cursors: dict[bytes, tuple[str, str] | None] = {}
        self.portal_cursor: tuple[str, str] | None = None
        self.cursor_rows: dict[str, int] = {}  # rows each capped cursor delivered so far
        self.fetching: str | None = None  # the cursor of the FETCH now running
        self.in_round = False  # extended-protocol messages sent to the server since a Sync
        self.hold_at_sync = False  # an error-mode capped Execute: hold at the next Sync
        self.holding = False  # waiting for the answer of such a request (see _hold_until_answered)
        self.capturing = False  # reading session settings back from a server
        self._parse_memo: tuple[bytes, codec.ParseMessage] | None = None
        self.statement_caps: dict[bytes, tuple[int, bool] | None] = {}
        self.portal_cap: tuple[int, bool] | None = None
        self.admin = False
        self._app_for: Settings | None = None
        self._app = ""
        self.last_activity = time.perf_counter()
        self.tls = False
        self.ended_by_proxy = False
        self.task: str | None = None
        self.unnamed: tuple[bytes, bytes] | None = None  # the client's unnamed statement
        self.unnamed_on: ServerConn | None = None  # the server where it is current
        self.local_skip = False  # discarding until Sync after a locally answered error
        self.pending_error: GuardError | None = None
        self.pinned = proxy.settings.pool_mode == "session"
        self.settings: Settings = ()
        self.settings_dirty = False
        # client name -> (server name, query, parameter types, generation of the client's Parse)
        self.statements: dict[bytes, tuple[bytes, bytes, bytes, int]] = {}
        self.cancel_key = proxy.new_cancel_key()
        self._startup_buf = b""
        self._login_waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.transactions = 0
        self.agent_type = "default"
        self.stats = AgentStats("none", "none")  # unregistered; replaced at login
        self.stmt_started = 0.0
        self.attached_at = 0.0
        self.last_kind = "query"  # read or write once the guard judged it; "query" without policies
        self.portal_kind = "query"  # the same, for the statement the last Bind named
        self.last_decision = "allowed"
        self.queries = 0

    # ------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(
            asyncio.Transport, transport
        )  # uvloop's transports are not subclasses
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._task = asyncio.get_running_loop().create_task(run_login(self))

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.perf_counter()
        if not self.logged_in:
            self._startup_buf += data
            if len(self._startup_buf) > self.proxy.settings.max_message_size:
                self.fatal(ProtocolViolation("login messages exceed max_message_size"))
                return
            waiter = self._login_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            return
        opened = begin_batch()  # what this sends to a server leaves in one write, at the end
        try:
            self.reader.feed(data)
            if not self.blocked:
                self._process()
        except ProtocolViolation as exc:
            self.fatal(exc)
        finally:
            if opened:
                end_batch()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.proxy.forget(self)
        if self.logged_in:
            self.stats.sessions -= 1
        if self.pinned and self.proxy.settings.pool_mode == "transaction":
            self.pool.pinned -= 1
        if self._task is not None and not self._task.done():
            self._task.cancel()
        waiter = self._login_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        server, self.server = self.server, None
        unfinished = []
        if self.logged_in and self.reader.pending():
            unfinished.append(f"in the middle of a message ({self.reader.pending()} bytes)")
        if server is not None:
            if server.idle and not self.pinned and not self.settings_dirty:
                self.pool.release(server)
            else:
                # Closing the connection makes Postgres roll back whatever was open.
                self.pool.discard(server)
                unfinished.append(
                    "with a transaction or request open; its server connection was closed, so Postgres "
                    "rolled it back"
                )
        if unfinished and not self.ended_by_proxy:
            log.warning(
                "client %s (%s) disconnected %s", self.peer, self.agent_id, " and ".join(unfinished)
            )

    def pause_writing(self) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.resume_reading()

    # Client protocol seen by ServerConn
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def writelines(self, chunks: Iterable[bytes]) -> None:
        if self.transport is not None and not self.closed:
            self.transport.writelines(chunks)

    def pause_client_reading(self, pause: bool) -> None:
        if self.transport is None or self.closed:
            return
        if pause:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def fatal(self, exc: GuardError) -> None:
        """Tells the client why, logs one line, and closes this client only."""
        log.warning("client %s (%s): %s", self.peer, self.agent_id or "not logged in", exc.message)
        self.ended_by_proxy = True  # connection_lost need not log it again
        if self.transport is not None and not self.closed:
            self.transport.write(
                codec.build_error(exc.sqlstate, exc.message, severity="FATAL", hint=exc.hint)
            )
            self.transport.close()
        self.closed = True

    # ------------------------------------------------------------ login

    async def recv_startup(self, typed: bool) -> tuple[int, bytes]:
        """Next login-phase packet: untyped startup packets, then typed messages."""
        max_size = self.proxy.settings.max_message_size
        while True:
            if self.closed:
                raise ConnectionResetError("client went away during login")
            buf = self._startup_buf
            if typed:
                reader = codec.MessageReader(min(max_size, 1 << 16))
                reader.feed(buf)
                got = reader.next()
                if got is not None:
                    self._startup_buf = reader.take_rest()
                    return got
            else:
                packet = codec.read_startup(buf, max_size)
                if packet is not None:
                    consumed, body = packet
                    self._startup_buf = buf[consumed:]
                    return 0, body
            self._login_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._login_waiter
            finally:
                self._login_waiter = None

    @property
    def peer_host(self) -> str:
        return self.peer.rpartition(":")[0]

    def peer_common_name(self) -> str | None:
        if not self.tls or self.transport is None:
            return None
        return peer_common_name(self.transport.get_extra_info("ssl_object"))

    @property
    def server_app_name(self) -> str:
        """application_name on the server while this client holds it: the agent, then the client's own."""
        settings = self.settings
        if (
            settings is not self._app_for
        ):  # computed once per change of settings, not per transaction
            own = dict(settings).get("application_name", "")
            self._app = f"{self.agent_id}/{own}" if own else self.agent_id
            self._app_for = settings
        return self._app

    def policies_reloaded(self) -> None:
        """After RELOAD or SIGHUP: judge with the new policy of this agent's type from now on."""
        guard, proxy = self.guard, self.proxy
        if guard is None or proxy.policies is None or proxy.judge is None:
            return
        policy = proxy.policies.match(self.agent_id)
        if policy is None or policy.name != guard.policy.name:
            self.kill(
                f"the policies changed and agent {self.agent_id} is no longer of type {guard.policy.name}"
            )
            return
        guard.policy, guard.judge_engine = policy, proxy.judge

    # ------------------------------------------------------------ relaying

    def _process(self) -> None:
        """Relays every complete client message; stops when it must wait for a server."""
        reader = self.reader
        guard = self.guard
        while not self.blocked and not self.closed:
            held, self.held = self.held, None
            if held is not None:
                kind, raw = held
            else:
                msg = reader.next()
                if msg is None:
                    return
                kind, raw = msg
                if kind == 88:  # Terminate
                    if self.transport is not None:
                        self.transport.close()
                    return
                if kind not in codec.FRONTEND_TYPES:
                    raise ProtocolViolation(f"unknown message type {chr(kind)!r} from client")
                if (self.local_skip or self.pending_error is not None) and self._answer_locally(
                    kind
                ):
                    continue
                if self.admin:
                    self._admin_message(kind, raw)
                    continue
                if kind == 81:
                    self._inspect(codec.parse_query(raw))  # the agent's own text, before our tag
                elif kind == 80:
                    self._inspect(self._parse_of(raw).query)
                if guard is not None and (kind == 81 or kind == 80):
                    started = time.perf_counter()
                    try:
                        raw = guard.judge(kind, raw)
                    except GuardError as denial:
                        self.deny(kind, denial)
                        continue
                    except LocalAnswer as answer:
                        self._answer(kind, answer.response)
                        continue
                    self.last_decision = guard.last_decision
                    self.last_kind = "write" if guard.last_write is not None else "read"
                    self.proxy.stats.proxy_latency.observe(time.perf_counter() - started)
                    self.row_cap, self.cursor = guard.last_row_cap, guard.last_cursor
                    if kind == 80:
                        name = self._parse_of(raw).name
                        self.statement_caps[name] = guard.last_row_cap
                        self.statement_cursors[name] = guard.last_cursor
                    if guard.last_plan_check is not None and self.plans.judged(kind, raw, guard):
                        continue
                    if self.after_judge(kind, raw):
                        continue
                elif (kind == 66 or self.writes.collecting is not None) and self.writes.collect(
                    kind, raw
                ):
                    continue
            server = self.server
            if server is None and self._answer_without_server(kind, raw):
                continue
            if server is None:
                server = self.pool.try_acquire()
                if server is None:
                    self.held = (kind, raw)
                    self._start_acquire()
                    return
                self.attach(server)
            self._relay(server, kind, raw)

    def after_judge(self, kind: int, raw: bytes) -> bool:
        """A judged, allowed message's last stop before its server; True when taken."""
        guard = self.guard
        assert guard is not None
        return guard.last_write is not None and self.writes.judged(kind, raw, guard)

    # ------------------------------------------------------------ managed writes' needs

    async def server_for_internal_use(self, purpose: str) -> ServerConn:
        """The session's server (acquired if it has none) in internal mode, once every
        earlier answer has gone out: what the proxy runs on it now reaches no client."""
        server = self.server
        if server is None:
            server = await self.pool.acquire()
            self.attach(server)
        if server.pending:
            # earlier answers (a settings replay, a ParseComplete) go out first; Postgres
            # holds extended-protocol answers until a Flush or Sync
            server.send(codec.FLUSH)
        while server.pending:
            await asyncio.sleep(0.0005)
            if server.closed or self.server is not server:
                raise UpstreamError(f"server connection lost before {purpose}")
        server.client = None
        return server

    def internal_use_failed(self, exc: BaseException, kind: int = 81) -> None:
        """The server of an internal exchange is never reused; the client gets the error
        (with ReadyForQuery for a whole request, else discarding up to its Sync)."""
        server, self.server = self.server, None
        if server is not None:
            self.pool.discard(server)
        if isinstance(exc, asyncio.CancelledError):
            return
        error = (
            exc if isinstance(exc, GuardError) else UpstreamError(f"server connection lost: {exc}")
        )
        self._fail_request(kind, error)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._task = asyncio.get_running_loop().create_task(coro)

    def prepare_prefix(self, server: ServerConn, statement: bytes) -> tuple[bytes, int]:
        """Parse (and Close) messages that make ``statement`` current on ``server``, and their count."""
        if statement:
            known = self.statements.get(statement)
            if known is None:
                return b"", 0
            sname, query, types, generation = known
            if server.prepared.get(sname, -1) >= generation:
                return b"", 0
            out, count = b"", 0
            if sname in server.prepared or sname in server.to_close:
                out, count = codec.build_close_statement(sname), 1
                server.to_close.discard(sname)
            server.prepared[sname] = generation
            return out + codec.build_parse(sname, query, types), count + 1
        if self.unnamed is None:
            return b"", 0
        # always: the managed write's own BEGIN (a simple Query) drops the unnamed statement
        self.unnamed_on = server
        return codec.build_parse(b"", *self.unnamed), 1

    def rename_bind(self, server: ServerConn, request: bytes, statement: bytes) -> bytes:
        """The request with its first Bind naming the server's copy of ``statement``."""
        if not statement or statement not in self.statements:
            return request
        length = int.from_bytes(request[1:5], "big") + 1
        bind, rest = request[:length], request[length:]
        _, start, end = codec.bind_statement(bind)
        return codec.replace_field(bind, start, end, self.statements[statement][0]) + rest

    def after_managed(self, server: ServerConn) -> None:
        """After a managed write: keep the server inside a transaction, else give it back."""
        if self.server is not server:
            self.attach(server)
        if server.status == b"I" and not server.pending:
            self.server_idle()

    def _admin_message(self, kind: int, raw: bytes) -> None:
        if kind != 81:
            if kind == 83:
                self.write(codec.ready_for_query(b"I"))
                return
            self._fail_request(
                kind, GuardError("the admin console takes simple queries only", sqlstate="0A000")
            )
            return
        self.blocked = True
        self._task = asyncio.get_running_loop().create_task(
            self._admin_query(codec.parse_query(raw).decode())
        )

    async def _admin_query(self, sql: str) -> None:
        from guardproxy.server import admin

        try:
            answer = await admin.run(self.proxy, sql)
        except GuardError as exc:
            self._fail_request(81, exc)
        else:
            self.write(answer + codec.ready_for_query(b"I"))
        self.blocked = False
        self.resume()

    def kill(self, reason: str) -> None:
        """Ends this session; a lent server is closed, so its transaction rolls back."""
        server, self.server = self.server, None
        if server is not None:
            self.pool.discard(server)
        self.fatal(GuardError(reason, sqlstate="57P01"))

    def _answer(self, kind: int, response: bytes) -> None:
        """Sends the proxy's own answer to a Query, after whatever the server still owes."""
        server = self.server
        if server is None:
            self.write(response + codec.ready_for_query(b"I"))
        else:
            server.expect(SYNTH, data=response + codec.ready_for_query(server.status))

    def end_transaction(self, reason: GuardError) -> None:
        """Rolls back the client's transaction by closing its server (transaction_timeout)."""
        if self.server is not None:
            self.stats.timeouts += 1
            self.server_lost(
                UpstreamError(reason.message, sqlstate=reason.sqlstate, hint=reason.hint)
            )

    def deny(self, kind: int, denial: GuardError) -> None:
        """Refuses a statement the way a Postgres error would, transaction state included."""
        self.stats.statements[self.last_kind, "denied"] += 1
        guard = self.guard
        if guard is not None:
            self.writes.audit(
                guard, guard.last_sql, "denied", rule=guard.last_rule, reason=denial.message
            )
        server = self.server
        if server is None:
            # Outside any transaction: nothing on a server to abort.
            self._fail_request(kind, denial)
            return
        # Inside a transaction (or a pipeline): let the server raise it, so the
        # transaction is aborted exactly as by any other error, in order.
        server.send(codec.build_query(raise_sql(denial)))
        if kind == 81:
            server.expect(QUERY)
        else:
            server.expect(QUERY, data=KEEP_ERROR_ONLY)
            self.local_skip = True

    def _answer_locally(self, kind: int) -> bool:
        """Handles a message while an earlier error is being reported; True if consumed."""
        if self.pending_error is not None:
            if kind in (81, 83, 80, 66, 68, 69, 67, 72):
                err, self.pending_error = self.pending_error, None
                self._fail_request(kind, err)
            return True  # stray COPY data after the server was lost is dropped
        # local_skip: discard until Sync, as the server does after an error
        if kind == 83:
            self.local_skip = False
            server = self.server
            if server is None:
                self.write(codec.ready_for_query(b"I"))
            else:
                server.send(codec.SYNC)
                server.expect(SYNC)
        return True

    def _answer_without_server(self, kind: int, raw: bytes) -> bool:
        """Answers what needs no server: preparing, closing and syncing with none lent.

        A named Parse outside a transaction is recorded and prepared lazily on the
        server that first runs it; its syntax is checked here so errors still come
        at Parse time. Clients that prepare synchronously while another of their
        connections holds the last server (pgbench -M prepared) never deadlock.
        """
        if kind == 80:
            parsed = self._parse_of(raw)
            if not parsed.name:
                return False
            error = syntax_error(parsed.query)
            if error is not None:
                self._fail_request(kind, error)
                return True
            sname = server_statement_name(parsed.query, parsed.tail, self.search_path)
            self.statements[parsed.name] = (sname, parsed.query, parsed.tail, next(_generations))
            self.write(codec.PARSE_COMPLETE)
            return True
        if kind == 83:
            self.write(codec.ready_for_query(b"I"))
            return True
        if kind == 72:
            return True
        if kind == 67:
            target, name = codec.describe_or_close_target(raw)
            if target == b"S" and name:
                self.statements.pop(name, None)
                self.write(codec.CLOSE_COMPLETE)
                return True
        return False

    def _fail_request(self, kind: int, exc: GuardError) -> None:
        """Answers the request that starts with ``kind`` with an error, as Postgres would."""
        status = self.server.status if self.server is not None else b"I"
        err = codec.build_error(exc.sqlstate, exc.message, hint=exc.hint)
        if kind == 81 or kind == 83:
            self.write(err + codec.ready_for_query(status))
        else:
            self.write(err)
            self.local_skip = True

    def _start_acquire(self) -> None:
        self.blocked = True
        if self.transport is not None:
            self.transport.pause_reading()
        self._task = asyncio.get_running_loop().create_task(self._acquire())

    async def _acquire(self) -> None:
        try:
            server = await self.pool.acquire()
        except GuardError as exc:
            log.warning("client %s (%s): %s", self.peer, self.agent_id, exc.message)
            self.blocked = False
            held, self.held = self.held, None
            if held is not None:
                self._fail_request(held[0], exc)
            self.resume()
            return
        except asyncio.CancelledError:
            return
        if self.closed:
            self.pool.release(server)
            return
        self.blocked = False
        self.attach(server)
        self.resume()

    def resume(self) -> None:
        if self.closed:
            return
        if self.transport is not None:
            self.transport.resume_reading()
        try:
            self._process()
        except ProtocolViolation as exc:
            self.fatal(exc)

    def attach(self, server: ServerConn) -> None:
        self.server = server
        self.unnamed_on = None
        server.client = self
        self.transactions += 1
        self.attached_at = self.stmt_started = time.perf_counter()
        app = self.server_app_name
        if server.settings_key != self.settings:
            server.send(codec.build_query(replay_sql(self.settings, app)))
            server.expect(QUERY, swallow=True)
            server.settings_key = self.settings
            server.app_name = app
        elif server.app_name != app:
            server.send(codec.build_query(app_name_sql(app)))
            server.expect(QUERY, swallow=True)
            server.app_name = app

    def _relay(self, server: ServerConn, kind: int, raw: bytes) -> None:
        if kind != 81 and kind != 72:
            self.in_round = kind != 83
        if kind == 81:  # Query
            self.queries += 1
            if not server.pending:
                self.stmt_started = time.perf_counter()
            self.unnamed = None  # a simple Query drops the unnamed statement, as in Postgres
            self.stats.statements[self.last_kind, self.last_decision] += 1
            server.row_cap, server.row_cap_error = self.row_cap or (0, False)
            if self.cursor is not None:
                self._count_cursor(server, self.cursor)
            server.send(raw)
            server.expect(QUERY)
            if server.row_cap_error:
                self._hold_until_answered(server)
        elif kind == 80:  # Parse
            self._relay_parse(server, raw)
        elif kind == 66:  # Bind
            name, start, end = codec.bind_statement(raw)
            sname = self._ensure_prepared(server, name) if name else self._ensure_unnamed(server)
            if sname is not None:
                raw = codec.replace_field(raw, start, end, sname)
            self.portal_cap = self.statement_caps.get(name)
            self.portal_cursor = self.statement_cursors.get(name)
            if self.guard is not None:
                self.portal_kind = "write" if name in self.writes.plans else "read"
            server.send(raw)
            server.expect(BIND, data=sname)
        elif kind == 69:  # Execute
            self.queries += 1
            self.stats.statements[self.portal_kind, "allowed"] += 1
            server.row_cap, server.row_cap_error = self.portal_cap or (0, False)
            if self.portal_cursor is not None:
                self._count_cursor(server, self.portal_cursor)
            if not server.pending:
                self.stmt_started = time.perf_counter()
            server.send(raw)
            server.expect(EXECUTE)
            self.hold_at_sync = server.row_cap_error
        elif kind == 83:  # Sync
            server.send(raw)
            server.expect(SYNC)
            if self.hold_at_sync:
                self.hold_at_sync = False
                self._hold_until_answered(server)
        elif kind == 68:  # Describe
            target, name = codec.describe_or_close_target(raw)
            if target == b"S":
                sname = (
                    self._ensure_prepared(server, name) if name else self._ensure_unnamed(server)
                )
                if sname is not None:
                    raw = codec.message(b"D", b"S" + sname + b"\x00")
            server.send(raw)
            server.expect(DESCRIBE)
        elif kind == 67:  # Close
            target, name = codec.describe_or_close_target(raw)
            if target == b"S" and name:
                # The server-side statement stays cached for reuse; the client's name goes.
                # Closing a name it never prepared closes nothing, as in Postgres.
                self.statements.pop(name, None)
                server.expect(SYNTH, data=codec.CLOSE_COMPLETE)
            else:
                server.send(raw)
                server.expect(CLOSE)
        elif kind == 72 or kind in (100, 99, 102):  # Flush
            server.send(raw)
        else:
            raise ProtocolViolation(f"unknown or unexpected message type {chr(kind)!r} from client")

    def _parse_of(self, raw: bytes) -> codec.ParseMessage:
        """A Parse message's fields, parsed once however many steps look at them."""
        memo = self._parse_memo
        if memo is not None and memo[0] is raw:
            return memo[1]
        parsed = codec.parse_parse(raw)
        self._parse_memo = (raw, parsed)
        return parsed

    def _hold_until_answered(self, server: ServerConn) -> None:
        """Reads nothing more from the client until this request is answered.

        With ``on_rows_returned_over: error`` the proxy may turn the answer into an
        error and then abort the transaction on the server: what the client sent
        after it (a COMMIT) must reach the server only after that, as Postgres would
        have refused it.
        """
        server.hold_rounds = sum(1 for entry in server.pending if entry[0] in (SYNC, QUERY))
        self.holding = self.blocked = True
        if self.transport is not None:
            self.transport.pause_reading()

    def round_finished(self) -> None:
        if self.holding:
            self.holding = False
            if not self.capturing:  # else reading settings back unblocks when done
                self.blocked = False
                self.resume()

    def _count_cursor(self, server: ServerConn, cursor: tuple[str, str]) -> None:
        """Makes a row cap hold per cursor: a FETCH starts counting where the last one ended."""
        verb, name = cursor
        if verb == "declare":
            self.cursor_rows[name] = 0
            return
        self.fetching = name
        server.rows_seen = server.rows_offset = self.cursor_rows.get(name, 0)

    def _relay_parse(self, server: ServerConn, raw: bytes) -> None:
        parsed = self._parse_of(raw)
        if not parsed.name:
            self.unnamed = (parsed.query, parsed.tail)
            self.unnamed_on = server
            server.send(raw)
            server.expect(PARSE)
            return
        sname = server_statement_name(parsed.query, parsed.tail, self.search_path)
        generation = next(_generations)
        self.statements[parsed.name] = (sname, parsed.query, parsed.tail, generation)
        self._prepare_on(server, sname, parsed.query, parsed.tail, generation, swallow=False)

    def _ensure_prepared(self, server: ServerConn, name: bytes) -> bytes | None:
        """Server name of a client statement, prepared on ``server`` first if needed.

        A server's copy is used only if it was prepared after the client's own
        Parse: a client that prepares again (after DDL, DEALLOCATE, a stale plan)
        must never get a copy made before the change.
        """
        known = self.statements.get(name)
        if known is None:
            # never the client's: a name another client's statement has on this server
            # must not reach it. The server answers "does not exist" (26000), in order.
            return NOT_PREPARED_BY_CLIENT
        sname, query, types, generation = known
        if server.prepared.get(sname, -1) < generation:
            self._prepare_on(server, sname, query, types, generation, swallow=True)
        return sname

    def _prepare_on(
        self,
        server: ServerConn,
        sname: bytes,
        query: bytes,
        types: bytes,
        generation: int,
        swallow: bool,
    ) -> None:
        if sname in server.prepared or sname in server.to_close:
            server.send(codec.build_close_statement(sname))
            server.expect(CLOSE, swallow=True)
            server.to_close.discard(sname)
        server.send(codec.build_parse(sname, query, types))
        server.prepared[sname] = generation
        server.expect(PARSE, swallow=swallow, data=sname)

    @property
    def search_path(self) -> str:
        for key, value in self.settings:
            if key == "search_path":
                return value
        return ""

    def _ensure_unnamed(self, server: ServerConn) -> bytes | None:
        """Makes the client's unnamed statement the one ``server`` holds.

        The unnamed statement outlives a Sync, so a client may Parse it in one
        round and Bind it in the next, on another server. Whatever unnamed
        statement that server holds belongs to someone else and must never run.
        """
        if self.unnamed_on is server:
            return None
        if self.unnamed is None:
            return NO_SUCH_STATEMENT  # the server answers "does not exist", in order
        query, types = self.unnamed
        server.send(codec.build_parse(b"", query, types))
        server.expect(PARSE, swallow=True)
        self.unnamed_on = server
        return None

    def _inspect(self, sql: bytes) -> None:
        lowered = sql.lower()
        if not self.pinned and _PIN_RE.search(lowered):
            self.pin("statement keeps state in its backend")
        if b"set_config" in lowered:
            self.settings_dirty = True

    def pin(self, why: str) -> None:
        if not self.pinned:
            self.pinned = True
            self.pool.pinned += 1
            log.debug("client %s pinned to its server: %s", self.peer, why)

    # ------------------------------------------------------------ server events

    def server_tag(self, tag: bytes) -> None:
        now = time.perf_counter()
        stats = self.stats
        stats.statement_time.observe(now - self.stmt_started)
        self.stmt_started = now
        if tag[:7] == b"SELECT ":  # most statements: nothing to look for but the row count
            stats.rows_returned += int(tag[7:])
            return
        if self.fetching is not None and tag[:6] == b"FETCH ":
            self.cursor_rows[self.fetching] = self.cursor_rows.get(self.fetching, 0) + int(tag[6:])
            self.fetching = None
        verb, _, count = tag.rpartition(b" ")
        if count.isdigit():
            if verb in _ROW_RETURNING:
                stats.rows_returned += int(count)
            else:
                stats.rows_affected += int(count)
        if tag.startswith((b"CREATE", b"ALTER", b"DROP")):
            self.proxy.catalog_changed()
        if tag in _SETTINGS_TAGS:
            self.settings_dirty = True
        if tag in _PIN_TAGS:
            self.pin("LISTEN")
        if tag in _FORGET_PREPARED_TAGS:
            self.statements.clear()  # as Postgres forgets them all for a direct client
            if self.server is not None:
                self.server.prepared.clear()

    def rows_truncated(self, cap: int) -> None:
        self.stats.statements["read", "truncated"] += 1
        guard = self.guard
        if guard is not None:
            self.writes.audit(
                guard, guard.last_sql, "truncated", rule="limits.max_rows_returned", rows=cap
            )

    def server_error(self, fields: dict[str, str]) -> None:
        # a failed statement used DB time too (timeouts most of all)
        now = time.perf_counter()
        self.stats.statement_time.observe(now - self.stmt_started)
        self.stmt_started = now
        if self.server is not None and self.server.status == b"T":
            self.stats.aborted_transactions += 1
        code = fields.get("C", "")
        if code == "57014":
            if "timeout" in fields.get("M", ""):
                self.stats.timeouts += 1
            else:
                self.stats.cancels += 1
        elif code == "25P03":
            self.stats.timeouts += 1

    def server_idle(self) -> None:
        if self.pinned or self.writes.running or self.plans.running:
            return
        if self.cursor_rows:
            self.cursor_rows.clear()  # its cursors ended with the transaction
        server = self.server
        assert server is not None
        self.last_activity = now = time.perf_counter()  # an answer just went out: idle from here
        self.stats.transaction_time.observe(now - self.attached_at)
        if self.settings_dirty:
            self.settings_dirty = False
            self.server = None
            server.client = None
            self.blocked = self.capturing = True
            self._task = asyncio.get_running_loop().create_task(self._capture_settings(server))
            return
        self.server = None
        self.pool.release(server)
        if self.held is not None or self.reader.pending():
            self._process()

    async def _capture_settings(self, server: ServerConn) -> None:
        try:
            rows = await server.query(CAPTURE_SETTINGS)
        except asyncio.CancelledError:
            self.pool.discard(server)  # the client left mid-query: the server is not clean
            raise
        except (GuardError, ConnectionError) as exc:
            log.warning("could not read back session settings: %s", exc)
            self.pool.discard(server)
        else:
            captured = dict((str(r[0]), str(r[1])) for r in rows)
            server.app_name = captured.get("application_name", "")
            if server.app_name == self.server_app_name:
                # ours, not the client's: keep the client's own name in its settings
                own = dict(self.settings).get("application_name")
                captured.pop("application_name", None)
                if own is not None:
                    captured["application_name"] = own
            self.settings = tuple(sorted(captured.items()))
            server.settings_key = self.settings
            self.pool.release(server)
        self.capturing = False
        if not self.holding:
            self.blocked = False
            self.resume()

    def server_lost(self, reason: UpstreamError) -> None:
        if self.holding:
            self.holding = self.blocked = False
            asyncio.get_running_loop().call_soon(self.resume)
        server, self.server = self.server, None
        if server is not None:
            self.pool.discard(server)
            if server.mid_message:
                # part of a large row already went out: any error now would land inside
                # it, so the client can only be disconnected
                log.warning(
                    "client %s (%s): %s in the middle of a row; closing the client",
                    self.peer,
                    self.agent_id,
                    reason.message,
                )
                self.ended_by_proxy = True
                if self.transport is not None:
                    self.transport.abort()
                return
        if self.pinned:
            # What the session kept in that backend is gone: the client must know.
            self.fatal(UpstreamError(reason.message, sqlstate=reason.sqlstate, hint=reason.hint))
            return
        rounds = sum(1 for entry in (server.pending if server else ()) if entry[0] in (SYNC, QUERY))
        awaiting = bool(server and server.pending)
        if not awaiting:
            self.pending_error = reason  # reported on the next request
            return
        self.write(codec.build_error(reason.sqlstate, reason.message, hint=reason.hint))
        if rounds:
            self.write(codec.ready_for_query(b"I") * rounds)
        else:
            self.local_skip = True
        if server is not None:
            server.pending.clear()

    # ------------------------------------------------------------ cancel

    def cancel(self) -> None:
        server = self.server
        if server is not None and server.pending and not server.closed:
            asyncio.get_running_loop().create_task(self._send_cancel(server))

    async def _send_cancel(self, server: ServerConn) -> None:
        # Re-checked after the await inside pool.cancel cannot help; check right before.
        if self.server is server and server.pending:
            await self.pool.cancel(server)
