"""One client connection: its socket, its login, and the I/O around its relay.

Everything the session decides lives in its ``Relay`` (``guardproxy.relay``),
which takes messages and gives back bytes and requests, without I/O. This module
does what the relay asks: it reads the client, writes both ways, borrows a server
from the pool when the relay holds a message for one, gives it back when the
relay says so, and runs the relay's internal jobs (managed writes, plan checks,
reading settings back) on the server, handing the outcomes back.

In transaction mode a server is borrowed when the client sends something and
given back on ReadyForQuery idle with nothing pending; what the client set up on
the server it had before is made to exist on the next one (settings replayed,
statements prepared again: see ``guardproxy.relay.registry``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import TYPE_CHECKING, Any, cast

import pglast

from guardproxy.jobs import managed_write, plan_check
from guardproxy.jobs import settings as session_settings
from guardproxy.jobs.settings import app_name_sql, replay_sql
from guardproxy.metrics import AgentStats
from guardproxy.pool.backend import Backend
from guardproxy.protocol import codec
from guardproxy.protocol import messages as m
from guardproxy.protocol.errors import Denied, GuardError, ProtocolViolation, UpstreamError
from guardproxy.relay.jobs import CaptureSettings, JudgeLarge, ManagedWrite, PlanCheck
from guardproxy.relay.judging import Analysis, Judging
from guardproxy.relay.relay import Hooks, Phase, Relay
from guardproxy.server.login import LoginResult, run_login, server_app_name
from guardproxy.server.tls import peer_common_name

if TYPE_CHECKING:
    from collections.abc import Iterable

    from guardproxy.server.services import ProxyServices

log = logging.getLogger("guardproxy.session")
PUMP_SLICE = 0.005  # seconds of one client's messages handled before the others get a turn
PUMP_CHECK = 8  # messages handled between two readings of the clock


def syntax_error(query: bytes) -> GuardError | None:
    """The Postgres parser's verdict on ``query`` (pglast wraps the server's own parser)."""
    try:
        pglast.parser.split(query.decode(errors="replace"))
    except pglast.parser.ParseError as exc:
        return GuardError(f"{exc.args[0]}", sqlstate="42601")
    return None


class _ClientCopy:
    """The client's side of a COPY FROM STDIN that a managed write runs (a job): the
    server's CopyInResponse goes to the client, its data comes back to the job."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session

    def to_client(self, raw: bytes) -> None:
        self.session.write(raw)

    async def from_client(self) -> tuple[int, bytes]:
        session = self.session
        while True:
            msg = session.reader.next()
            if msg is not None:
                return msg
            if session.closed:
                raise ConnectionResetError("the client went away during COPY FROM STDIN")
            session._copy_waiter = asyncio.get_running_loop().create_future()
            session._set_reading(True)
            try:
                await session._copy_waiter
            finally:
                session._copy_waiter = None
                session._set_reading(False)


class ClientSession(asyncio.Protocol):
    def __init__(self, proxy: ProxyServices) -> None:
        self.proxy = proxy
        self.pool = proxy.pool
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.agent_id = ""
        self.agent_type = "default"
        self.reader = codec.MessageReader(proxy.settings.max_message_size)
        self.relay: Relay | None = None  # from the end of the login on
        self.backend: Backend | None = None  # the server lent to this client now
        self.admin = False
        self.logged_in = False
        self.closed = False
        self.tls = False
        self.ended_by_proxy = False
        self.cancel_key = proxy.new_cancel_key()
        self.stats = AgentStats("none", "none")  # unregistered; replaced at login
        self.last_activity = time.perf_counter()
        self._startup_buf = b""
        self._login_waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._app_for: Any = None
        self._app = ""
        self._pin_counted = False
        self._reading = True
        self._admin_skip = False  # an error went out: discarding up to the next Sync
        self._copy_waiter: asyncio.Future[None] | None = None  # a job awaits COPY data
        self._startup_seen = False  # the first startup packet (or SSLRequest) came

    # ------------------------------------------------------------ what others read

    @property
    def phase(self) -> Phase:
        if self.closed:
            return Phase.CLOSED
        if self.admin:
            return Phase.ADMIN
        return self.relay.phase if self.relay is not None else Phase.LOGIN

    @property
    def server(self) -> Backend | None:
        return self.backend

    @property
    def blocked(self) -> bool:
        """Waiting for a server or for the proxy's own work: not idle."""
        return self.relay is not None and not self.relay.takes_messages

    @property
    def pinned(self) -> bool:
        return self.relay is not None and self.relay.pinned

    @property
    def task(self) -> str | None:
        relay = self.relay
        return relay.judging.context.task if relay and relay.judging else None

    @property
    def transactions(self) -> int:
        return self.relay.transactions if self.relay is not None else 0

    @property
    def queries(self) -> int:
        return self.relay.queries if self.relay is not None else 0

    @property
    def busy(self) -> bool:
        """Waiting for an answer or for a server: not idle, whatever the client does."""
        relay = self.relay
        return relay is not None and (bool(relay.inflight.pending) or not relay.takes_messages)

    def transaction_age(self, now: float) -> float | None:
        """Seconds since the lent server's transaction began, None outside one."""
        relay, backend = self.relay, self.backend
        if relay is None or backend is None or relay.tx_started is None:
            return None
        if backend.status == b"I" and not relay.inflight.pending:
            return None
        return now - relay.tx_started

    @property
    def server_app_name(self) -> str:
        """application_name on the server while this client holds it."""
        settings = self.relay.settings if self.relay is not None else ()
        if settings is not self._app_for:  # once per change of settings, not per transaction
            self._app = server_app_name(self.agent_id, settings)
            self._app_for = settings
        return self._app

    # ------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._task = asyncio.get_running_loop().create_task(self._login())

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
        try:
            self.reader.feed(data)
        except ProtocolViolation as exc:
            self.fatal(exc)
            return
        waiter = self._copy_waiter
        if waiter is not None:  # a managed COPY FROM STDIN reads the client itself
            if not waiter.done():
                waiter.set_result(None)
            return
        self._pump()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self._copy_waiter is not None and not self._copy_waiter.done():
            self._copy_waiter.set_result(None)
        self.proxy.forget(self)
        if self.logged_in:
            self.stats.sessions -= 1
        if self._pin_counted:
            self.pool.pinned -= 1
        if self._task is not None and not self._task.done():
            self._task.cancel()
        waiter = self._login_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        relay = self.relay
        backend, self.backend = self.backend, None
        unfinished = []
        if self.logged_in and self.reader.pending():
            unfinished.append(f"in the middle of a message ({self.reader.pending()} bytes)")
        if backend is not None:
            clean = (
                relay is not None
                and backend.status == b"I"
                and not relay.inflight.pending
                and not relay.in_round  # the server may hold a portal, or skip to a Sync
                and not relay.pinned
                and not relay.settings_dirty
                and relay.phase is not Phase.JOB
            )
            if relay is not None:
                relay.detach()
            if clean:
                self.pool.release(backend)
            else:
                # closing the connection makes Postgres roll back whatever was open
                self.pool.discard(backend)
                unfinished.append(
                    "with a transaction or request open; its server connection was closed, "
                    "so Postgres rolled it back"
                )
        if unfinished and not self.ended_by_proxy:
            log.warning(
                "client %s (%s) disconnected %s", self.peer, self.agent_id, " and ".join(unfinished)
            )

    def pause_writing(self) -> None:
        if self.backend is not None:
            self.backend.pause_reading(True)

    def resume_writing(self) -> None:
        if self.backend is not None:
            self.backend.pause_reading(False)

    def pause_client_reading(self, pause: bool) -> None:
        """Backpressure from the server (it cannot take more now)."""
        if self.transport is None or self.closed:
            return
        if pause:
            self.transport.pause_reading()
        elif self._reading:
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def writelines(self, chunks: Iterable[bytes]) -> None:
        if self.transport is not None and not self.closed:
            self.transport.writelines(chunks)

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

    def kill(self, reason: str) -> None:
        """Ends this session; a lent server is closed, so its transaction rolls back."""
        backend, self.backend = self.backend, None
        if backend is not None:
            if self.relay is not None:
                self.relay.detach()
            self.pool.discard(backend)
        self.fatal(GuardError(reason, sqlstate="57P01"))

    # ------------------------------------------------------------ login (a LoginChannel)

    async def recv_startup(self, typed: bool) -> tuple[int, bytes]:
        """Next login-phase packet: untyped startup packets, then typed messages."""
        max_size = self.proxy.settings.max_message_size
        while True:
            if self.closed:
                raise ConnectionResetError("client went away during login")
            buf = self._startup_buf
            first = not typed and not self.tls and not self._startup_seen
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
                    self._startup_seen = True
                    return 0, body
            self._login_waiter = asyncio.get_running_loop().create_future()
            try:
                if first:  # a socket that says nothing is closed early, not at the login deadline
                    async with asyncio.timeout(self.proxy.settings.client_startup_timeout):
                        await self._login_waiter
                else:
                    await self._login_waiter
            except TimeoutError:
                raise ProtocolViolation(
                    "no startup packet within client_startup_timeout", sqlstate="08006"
                ) from None
            finally:
                self._login_waiter = None

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """Answers an SSLRequest with 'S' and continues the connection over TLS."""
        assert self.transport is not None
        self.transport.write(b"S")
        loop = asyncio.get_running_loop()
        new = await loop.start_tls(
            self.transport, self, context, server_side=True, ssl_handshake_timeout=10
        )
        if new is None:
            raise ConnectionResetError("TLS handshake failed")
        self.transport = new
        self.tls = True

    def peer_common_name(self) -> str | None:
        if not self.tls or self.transport is None:
            return None
        return peer_common_name(self.transport.get_extra_info("ssl_object"))

    @property
    def peer_host(self) -> str:
        return self.peer.rpartition(":")[0]

    def login_evicted(self) -> None:
        """Too many connections are logging in at once and this one is the oldest."""
        self.fatal(
            ProtocolViolation(
                "too many connections are logging in at once and this one took the longest; "
                "connect again",
                sqlstate="53300",
            )
        )

    async def _login(self) -> None:
        try:
            result = await run_login(self, self.proxy)
        except GuardError as exc:
            self.fatal(exc)
            return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            self.proxy.login_done(self)
        if result is None:  # a cancel request
            if self.transport is not None:
                self.transport.close()
            return
        if self.closed:
            return
        try:
            self._logged_in(result)
        except Exception:  # a bug must end this client clearly, never leave it hanging
            log.exception("setting up the session of %r failed", self.agent_id)
            self.fatal(GuardError("guardproxy could not set up this session", sqlstate="XX000"))

    def _logged_in(self, result: LoginResult) -> None:
        proxy = self.proxy
        self.agent_id = result.agent_id
        self.admin = result.admin
        assert self.transport is not None
        if not self.admin:
            policy = result.policy
            if policy is not None:
                self.agent_type = policy.name
                self.pool = proxy.pool_for(policy.name)
            label = proxy.agent_label(self.agent_id)
            self.stats = proxy.stats.for_agent(self.agent_type, label)
            judging = None
            if policy is not None and result.context is not None and proxy.judge is not None:
                judging = Judging(
                    proxy.judge,
                    policy,
                    result.context,
                    self.stats,
                    proxy.stats,
                    proxy.verifier,
                    result.delegation,
                )
            self.relay = Relay(
                agent_id=self.agent_id,
                stats=self.stats,
                judging=judging,
                settings=result.settings,
                pinned=proxy.settings.pool_mode == "session",
                hooks=self._hooks(),
                syntax_check=syntax_error,
                auto_prepare=proxy.auto_prepare,
                max_prepared=proxy.settings.max_prepared_statements,
                max_statement_size=proxy.settings.max_statement_size,
                offload_above=proxy.settings.judge_offload_above
                if proxy.judge_workers is not None
                else 0,
            )
        # only once the session is set up: nothing it sends can reach a half-built relay
        out = [codec.AUTH_OK]
        out += [codec.build_parameter_status(k, v) for k, v in result.params.items()]
        out.append(codec.build_backend_key(*self.cancel_key))
        out.append(codec.ready_for_query(b"I"))
        self.transport.writelines(out)
        self.logged_in = True
        proxy.register(self)
        self.stats.sessions += 1
        self.stats.sessions_total += 1
        log.debug("client %s logged in as agent %r", self.peer, self.agent_id)
        rest, self._startup_buf = self._startup_buf, b""
        if rest:
            self.data_received(rest)

    def _hooks(self) -> Hooks:
        hooks = Hooks()
        proxy = self.proxy
        audit = proxy.audit
        if audit is not None:
            hooks.audit = audit.record
            hooks.audit_accepting = lambda: audit.accepting
        hooks.catalog_changed = proxy.catalog_changed
        hooks.pinned = self._pinned
        hooks.stale_statement = lambda name: self.pool.mark_stale(name)
        hooks.client_pid = self._client_pid
        return hooks

    def _pinned(self, reason: str) -> None:
        if self.proxy.settings.pool_mode == "transaction" and not self._pin_counted:
            self._pin_counted = True
            self.pool.pinned += 1
        log.debug("client %s pinned to its server: %s", self.peer, reason)

    def _client_pid(self, pid: int) -> int:
        """A notification's process id as this client knows it: its own for its server."""
        backend = self.backend
        if backend is not None and pid == backend.backend_pid:
            return self.cancel_key[0]
        return self.proxy.client_pid_of_backend(pid)

    def policies_reloaded(self) -> None:
        """After RELOAD or SIGHUP: judge with the new policy of this agent's type from now on.
        Statements prepared before are judged again before they run next."""
        proxy, relay = self.proxy, self.relay
        judging = relay.judging if relay is not None else None
        if judging is None or proxy.policies is None or proxy.judge is None:
            return
        policy = proxy.policies.match(self.agent_id)
        if policy is None or policy.name != judging.policy.name:
            self.kill(
                f"the policies changed and agent {self.agent_id} is no longer of type "
                f"{judging.policy.name}"
            )
            return
        judging.reloaded(policy, proxy.judge)

    # ------------------------------------------------------------ relaying

    def _pump(self) -> None:
        """Feeds the relay every complete client message it can take now, then acts."""
        relay = self.relay
        if relay is None:
            if self.admin:
                self._admin_pump()
            return
        reader = self.reader
        # one client's pipeline is taken in slices: the other sessions on this event loop
        # run between them, however many messages it sent at once. The clock is read
        # every PUMP_CHECK messages only: most reads hold a round of a few messages
        handled = 0
        until = 0.0
        sliced = False
        try:
            while not self.closed:
                if relay.held is not None:
                    if not self._ensure_server(relay):
                        break
                    relay.run_held()
                    continue
                if not relay.takes_messages:
                    break
                # a round the relay runs again comes before what the client sent next
                msg = relay.replaying.popleft() if relay.replaying else reader.next()
                if msg is None:
                    break
                kind, raw = msg
                if kind == m.FE_TERMINATE:
                    self._flush(relay)
                    if self.transport is not None:
                        self.transport.close()
                    return
                if kind not in m.FRONTEND_AFTER_LOGIN:
                    raise ProtocolViolation(f"unknown message type {chr(kind)!r} from client")
                relay.on_client(kind, raw)
                handled += 1
                if handled % PUMP_CHECK == 0:
                    now = time.perf_counter()
                    if not until:
                        until = now + PUMP_SLICE
                    elif now > until:
                        sliced = True
                        break
        except ProtocolViolation as exc:
            self._flush(relay)
            self.fatal(exc)
            return
        self._flush(relay)
        self._act(relay)
        if sliced and not self.closed:
            try:
                asyncio.get_running_loop().call_soon(self._pump)
            except RuntimeError:  # no event loop (a test driving the session by hand)
                self._pump()

    def _flush(self, relay: Relay) -> None:
        out = relay.to_backend
        if out:
            backend = self.backend
            if backend is not None:
                backend.send(b"".join(out) if len(out) > 1 else out[0])
            del out[:]
        out = relay.to_client
        if out:
            if self.transport is not None and not self.closed:
                self.transport.writelines(out)
            del out[:]

    def _act(self, relay: Relay) -> None:
        """Does what the relay asks for once it stopped: a job, a release, flow control."""
        if self.closed:
            return
        if relay.phase is Phase.JOB and relay.job is not None and not self._job_running():
            self._task = asyncio.get_running_loop().create_task(self._run_job(relay))
        if relay.wants_release and relay.phase is not Phase.JOB:
            self._release(relay)
            if relay.takes_messages and self.reader.pending():
                self._pump()
                return
        self._set_reading(relay.takes_messages and relay.held is None)

    def _set_reading(self, reading: bool) -> None:
        if reading == self._reading or self.transport is None or self.closed:
            return
        self._reading = reading
        if reading:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    def _job_running(self) -> bool:
        return (
            self._task is not None
            and not self._task.done()
            and self._task is not asyncio.current_task()
        )

    # ------------------------------------------------------------ servers

    def _ensure_server(self, relay: Relay) -> bool:
        """A server for the held message: True when there is one now, else one is on its way."""
        if self.backend is not None:
            return True
        backend = self.pool.try_acquire()
        if backend is None:
            relay.waiting_for_server()
            self._set_reading(False)
            self._task = asyncio.get_running_loop().create_task(self._acquire(relay))
            return False
        self._attach(relay, backend)
        return True

    async def _acquire(self, relay: Relay) -> None:
        try:
            backend = await self.pool.acquire()
            while backend.closed:
                # its connection ended between the pool handing it over and now: nobody
                # was attached to hear it, so a message sent to it would wait forever
                self.pool.discard(backend)
                backend = await self.pool.acquire()
        except GuardError as exc:
            log.warning("client %s (%s): %s", self.peer, self.agent_id, exc.message)
            relay.acquire_failed(exc)
            self._flush(relay)
            self._pump()
            return
        except asyncio.CancelledError:
            return
        if self.closed:
            self.pool.release(backend)
            return
        self._attach(relay, backend)
        self._pump()

    def _attach(self, relay: Relay, backend: Backend) -> None:
        self.backend = backend
        backend.client = self
        backend.last_client_pid = self.cancel_key[0]
        relay.attach(backend)
        app = self.server_app_name
        if backend.settings_key != relay.settings:
            relay.replay_settings(replay_sql(relay.settings, app))
            backend.settings_key = relay.settings
            backend.app_name = app
            backend.guard_sent = None  # RESET ALL cleared guard.* too
        elif backend.app_name != app:
            relay.replay_settings(app_name_sql(app))
            backend.app_name = app

    def _release(self, relay: Relay) -> None:
        backend, self.backend = self.backend, None
        relay.detach()
        self.last_activity = time.perf_counter()
        if backend is not None:
            backend.client = None
            self.pool.release(backend)

    def backend_data(self, data: bytes) -> None:
        relay = self.relay
        if relay is None:
            return
        try:
            relay.on_backend(data)
        except ProtocolViolation as exc:
            backend, self.backend = self.backend, None
            if backend is not None:
                self.pool.discard(backend)
            self._flush(relay)
            self.kill(f"the server broke the protocol: {exc.message}")
            return
        self._flush(relay)
        if (
            relay.takes_messages
            and relay.held is None
            and (self.reader.pending() or relay.replaying)
        ):
            self._pump()
        else:
            self._act(relay)

    def backend_lost(self, reason: UpstreamError) -> None:
        relay = self.relay
        backend, self.backend = self.backend, None
        if backend is not None:
            self.pool.discard(backend)
        if relay is None:
            return
        why = relay.backend_lost(reason)
        if why == "mid-row":
            # part of a large row already went out: any error now would land inside it
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
        if why == "pinned":
            # what the session kept in that backend is gone: the client must know
            self.fatal(UpstreamError(reason.message, sqlstate=reason.sqlstate, hint=reason.hint))
            return
        self._flush(relay)
        asyncio.get_running_loop().call_soon(self._pump)

    def end_transaction(self, reason: GuardError) -> None:
        """Rolls back the client's transaction by closing its server (transaction_timeout)."""
        if self.backend is not None:
            self.stats.timeouts += 1
            backend = self.backend
            backend.client = None
            self.backend_lost(
                UpstreamError(reason.message, sqlstate=reason.sqlstate, hint=reason.hint)
            )
            backend.abort()

    # ------------------------------------------------------------ jobs

    async def _run_job(self, relay: Relay) -> None:
        job = relay.job
        if isinstance(job, JudgeLarge):
            await self._judge_large(relay, job)
            return
        backend = self.backend
        assert job is not None and backend is not None
        backend.client = None  # internal mode: nothing reaches the client until the outcome
        try:
            outcome: Any
            if isinstance(job, ManagedWrite):
                outcome = await managed_write.run(
                    backend, job.request, job.run, job.simple, _ClientCopy(self)
                )
            elif isinstance(job, PlanCheck):
                judging = relay.judging
                assert judging is not None
                outcome = await plan_check.check(
                    backend,
                    judging.policy,
                    judging.judge_engine.catalog,
                    job.sql,
                    job.types,
                    self.pool.plan_estimates,
                )
            elif isinstance(job, CaptureSettings):
                outcome = await session_settings.capture(
                    backend, relay.settings, self.server_app_name
                )
            else:  # pragma: no cover
                raise AssertionError(f"unknown job {job!r}")
        except asyncio.CancelledError:
            self._job_broke(relay, backend, None)
            raise
        except (GuardError, ConnectionError, OSError) as exc:
            if isinstance(job, CaptureSettings):
                log.warning("could not read back session settings: %s", exc)
            error = (
                exc
                if isinstance(exc, GuardError)
                else UpstreamError(f"server connection lost: {exc}")
            )
            self._job_broke(relay, backend, error)
            return
        except Exception as exc:  # never leave the session stuck, whatever went wrong
            log.exception("internal job %s failed", type(job).__name__)
            self._job_broke(
                relay, backend, UpstreamError(f"internal error: {exc}", sqlstate="XX000")
            )
            return
        if self.closed or self.backend is not backend:
            return
        backend.client = self
        self._forward_stashed(backend)
        relay.job_done(outcome)
        self._flush(relay)
        self._pump()

    async def _judge_large(self, relay: Relay, job: JudgeLarge) -> None:
        """A large statement judged in a judge worker: the loop serves everyone meanwhile."""
        workers, judging = self.proxy.judge_workers, relay.judging
        assert workers is not None and judging is not None
        try:
            outcome: Any = await workers.analyze(
                judging.policy.name,
                job.text.decode(errors="replace"),
                job.context,
                judging.judge_engine.catalog,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a worker that cannot answer: refuse, never stall
            log.exception("judging a large statement failed")
            outcome = Analysis.refused(
                Denied(
                    f"guardproxy could not judge this statement ({exc}); it was not run",
                    rule="limits.analysis",
                    hint="retry; an operator should look at guardproxy's log",
                    sqlstate="XX000",
                )
            )
        if self.closed:
            return
        relay.job_done(outcome)
        self._flush(relay)
        self._pump()

    def _job_broke(self, relay: Relay, backend: Backend, error: GuardError | None) -> None:
        """The job's server is never reused; the client gets the error (if any)."""
        if self.backend is backend:
            self.backend = None
            self.pool.discard(backend)
        if error is None or self.closed:
            return
        relay.job_failed(error)
        self._flush(relay)
        self._pump()

    def _forward_stashed(self, backend: Backend) -> None:
        """Notifications that arrived while a job had the server go out now."""
        for raw in backend.take_stashed():
            pid = int.from_bytes(raw[5:9], "big", signed=True)
            mapped = self._client_pid(pid)
            if mapped != pid:
                raw = raw[:5] + mapped.to_bytes(4, "big", signed=True) + raw[9:]
            self.write(raw)

    # ------------------------------------------------------------ admin console

    def _admin_pump(self) -> None:
        if self._job_running():
            return
        try:
            msg = self.reader.next()
        except ProtocolViolation as exc:
            self.fatal(exc)
            return
        if msg is None:
            return
        kind, raw = msg
        if kind == m.FE_TERMINATE:
            if self.transport is not None:
                self.transport.close()
            return
        if kind == m.FE_QUERY:
            self._set_reading(False)
            self._task = asyncio.get_running_loop().create_task(
                self._admin_query(codec.parse_query(raw).decode(errors="replace"))
            )
            return
        if kind == m.FE_SYNC:
            self._admin_skip = False
            self.write(codec.ready_for_query(b"I"))
        elif kind != m.FE_FLUSH and not self._admin_skip:
            self._admin_skip = True
            self.write(codec.build_error("0A000", "the admin console takes simple queries only"))
        self._admin_pump()

    async def _admin_query(self, sql: str) -> None:
        try:
            answer = await self.proxy.admin_query(sql, by=self.agent_id)
        except GuardError as exc:
            self.write(
                codec.build_error(exc.sqlstate, exc.message, hint=exc.hint)
                + codec.ready_for_query(b"I")
            )
        else:
            self.write(answer + codec.ready_for_query(b"I"))
        self._set_reading(True)
        asyncio.get_running_loop().call_soon(self._admin_pump)

    # ------------------------------------------------------------ cancel

    def cancel(self) -> None:
        backend, relay = self.backend, self.relay
        if (
            backend is not None
            and relay is not None
            and not backend.closed
            and (relay.inflight.pending or relay.phase is Phase.JOB)
        ):
            asyncio.get_running_loop().create_task(self._send_cancel(backend))

    async def _send_cancel(self, backend: Backend) -> None:
        if self.backend is backend:
            await self.pool.cancel(backend)
