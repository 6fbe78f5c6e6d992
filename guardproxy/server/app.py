"""The proxy process: listener, registry of sessions (for cancel), lifecycle.

Lifecycle follows startup / serve / shutdown: SIGTERM stops accepting, lets
clients finish for up to ``shutdown_timeout`` seconds, then closes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Literal

from prometheus_client import CollectorRegistry

from guardproxy import native
from guardproxy.analysis.catalog import CATALOG_QUERY, FOREIGN_KEYS_QUERY, SEARCH_PATH_QUERY
from guardproxy.config import Settings, Upstream
from guardproxy.delegation import binding, console
from guardproxy.delegation.revocations import RevocationCache, RevocationStore
from guardproxy.delegation.verify import Verifier as TokenVerifier
from guardproxy.metrics import GuardproxyCollector, PoolView, StatsRegistry
from guardproxy.onboarding.privileges import check_login
from guardproxy.policy import AgentPolicy, Catalog, Judge, PolicyError, PolicySet, load_policy_set
from guardproxy.pool.pool import Pool
from guardproxy.protocol import codec
from guardproxy.protocol.errors import AuthFailed, ConfigError, GuardError
from guardproxy.protocol.scram import Verifier, load_verifiers
from guardproxy.relay.autoprepare import AutoPrepare
from guardproxy.server import admin
from guardproxy.server.cancel import NO_SLOT, new_cancel_key, send_cancel, slot_of, worker_of
from guardproxy.server.http import OpsServer
from guardproxy.server.instances import (
    InstanceRegistry,
    SlotCell,
    advertised_address,
    is_loopback_address,
)
from guardproxy.server.judge_workers import JudgeWorkers
from guardproxy.server.login_limits import LoginLimits
from guardproxy.server.session import ClientSession
from guardproxy.server.tls import ServerTLS
from guardproxy.server.workers import CancelRelay
from guardproxy.store.audit_writer import AuditLog
from guardproxy.store.schema_version import SCHEMA_HEAD

log = logging.getLogger("guardproxy")

FORWARD_TIMEOUT = 2.0  # seconds to connect to another instance and hand it a cancel request
MAX_FORWARDS = 256  # cancel requests being forwarded to other instances at once, at most
# Where a cancel request came from: a client, another instance (the relayed code), a worker.
CancelOrigin = Literal["client", "peer", "worker"]


def worker_share(limit: int, workers: int, worker: int) -> int:
    """This worker's part of a per-instance connection limit: the parts add up to the
    limit (the role's CONNECTION LIMIT holds), and no worker gets none."""
    if workers <= 1:
        return limit
    if limit < workers:
        log.warning(
            "a limit of %d server connections cannot be split over %d workers; each worker "
            "gets 1, so up to %d may be open",
            limit,
            workers,
            workers,
        )
        return 1
    return limit // workers + (1 if worker < limit % workers else 0)


class Proxy:
    def __init__(
        self,
        settings: Settings,
        upstream: Upstream,
        worker: int = 0,
        slot_cell: SlotCell | None = None,
    ) -> None:
        self.settings = settings
        self.worker = worker
        self.relay: CancelRelay | None = None
        # this instance's registry slot, shared by its workers (worker 0 claims it)
        self.slot_cell = slot_cell if slot_cell is not None else SlotCell()
        self._forwards: set[asyncio.Task[None]] = set()
        self._registry_task: asyncio.Task[None] | None = None
        self.upstream = upstream
        self.pools: dict[str, Pool] = {"default": Pool(settings, upstream)}
        self.policies: PolicySet | None = None
        self.judge: Judge | None = None
        if settings.policies is not None:
            self.policies = load_policy_set(settings.policies)
            self.judge = Judge(self.policies)
            self._make_pools(self.policies)
        self._catalog_task: asyncio.Task[None] | None = None
        self.audit: AuditLog | None = None
        # large statements are judged in worker processes, off the event loop
        self.judge_workers: JudgeWorkers | None = (
            JudgeWorkers(settings.policies, settings.judge_workers, settings.judge_timeout)
            if settings.policies is not None and settings.judge_offload_above
            else None
        )
        # unnamed statements sent again and again are prepared on the servers
        self.auto_prepare: AutoPrepare | None = (
            AutoPrepare(settings.auto_prepare_after) if settings.auto_prepare_after else None
        )
        # delegation tokens: verified with the issuers' keys, checked against revocations
        self.verifier: TokenVerifier | None = None
        self.revocations: RevocationCache | None = None
        self.tls: ServerTLS | None = None
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            self.tls = ServerTLS(
                settings.tls_cert_file,
                settings.tls_key_file,
                settings.tls_client_ca_file,
                settings.tls_mode == "require",
            )
            self.tls.context()  # fail at start, not at the first client, if the files are wrong
        self.login_limits = LoginLimits(settings.auth_max_failures)
        self.verifiers: dict[str, Verifier] = (
            load_verifiers(settings.auth_file) if settings.auth_file is not None else {}
        )
        self.sessions: dict[tuple[int, int], ClientSession] = {}
        self.clients = 0
        # connections still logging in, oldest first (a dict keeps insertion order)
        self.pending_logins: dict[ClientSession, None] = {}
        self.stats = StatsRegistry()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GuardproxyCollector(self.stats, self.pool_views))
        self.instances = InstanceRegistry(self.pools["default"], settings, self.slot_cell)
        self.ops: OpsServer | None = None
        self._server: asyncio.AbstractServer | None = None
        self._stopping: asyncio.Event | None = None
        self.bound_port = settings.listen_port

    # ------------------------------------------------------------ sessions

    def new_session(self) -> ClientSession:
        self.clients += 1
        session = ClientSession(self)
        pending = self.pending_logins
        if len(pending) >= self.settings.max_pending_logins:
            # a flood of connections that never log in cannot keep agents out: the
            # oldest login in progress gives way (it has had the longest time)
            oldest = next(iter(pending))
            del pending[oldest]
            oldest.login_evicted()
        pending[session] = None
        return session

    def login_done(self, session: ClientSession) -> None:
        """The session logged in (or gave up): it no longer holds a pending login."""
        self.pending_logins.pop(session, None)

    def at_client_limit(self) -> bool:
        """Logged-in clients fill max_client_conn; logins in progress do not."""
        return len(self.sessions) >= self.settings.max_client_conn

    def new_cancel_key(self) -> tuple[int, int]:
        """The BackendKeyData a new client session gets: it says where a cancel must go
        (this instance's registry slot and this worker, see cancel.py)."""
        return new_cancel_key(self.slot_cell.slot, self.worker)

    def register(self, session: ClientSession) -> None:
        self.sessions[session.cancel_key] = session

    def forget(self, session: ClientSession) -> None:
        self.clients -= 1
        self.pending_logins.pop(session, None)
        if self.sessions.get(session.cancel_key) is session:
            del self.sessions[session.cancel_key]

    async def admin_query(self, sql: str, by: str = "") -> bytes:
        """One statement of the admin console: its whole answer (no ReadyForQuery)."""
        command = console.parse(sql)
        if command is None:
            return await admin.run(self, sql)
        if self.revocations is None:
            raise GuardError(
                "delegation tokens are not in use: no issuer is configured "
                "(delegation_issuers) and no policy takes tokens",
                sqlstate="55000",
            )
        delegations = [
            d
            for s in self.sessions.values()
            if s.relay is not None
            and s.relay.judging is not None
            and (d := s.relay.judging.delegation) is not None
        ]
        columns, rows, tag = await console.run(
            command, self.revocations.store, self.revocations, by, delegations
        )
        return admin.result(columns, rows, tag)

    async def _start_delegation(self) -> None:
        """Delegation tokens, when issuers are configured or a policy takes tokens."""
        uses = self.policies is not None and any(binding.mode(p) != "off" for p in self.policies)
        if not (self.settings.delegation_issuers or uses) or self.settings.upstream is None:
            return
        self.revocations = RevocationCache(
            RevocationStore(self.settings.upstream),
            self.settings.delegation_revocations_refresh,
            self.settings.delegation_clock_skew,
        )
        await self.revocations.start()
        self.verifier = TokenVerifier.from_settings(self.settings, self.revocations)
        problems = self.verifier.key_problems()
        if problems:
            raise ConfigError("delegation issuers: " + "; ".join(problems))

    def client_pid_of_backend(self, backend_pid: int) -> int:
        """The process id a client of this proxy knows for the server with ``backend_pid``
        (the last client it was lent to), or ``backend_pid`` itself for any other."""
        for pool in self.pools.values():
            for server in pool.servers:
                if server.backend_pid == backend_pid and server.last_client_pid:
                    return server.last_client_pid
        return backend_pid

    def cancel(self, pid: int, secret: int, origin: CancelOrigin = "client") -> None:
        """A cancel request: for a session of this worker, or routed to where the key says.

        A key of another instance's slot goes to that instance's registered address
        (with the relayed code); a key of another worker of this instance goes to that
        worker. What came from another instance is never sent to a third, and what came
        from a worker is never sent anywhere, so no registry state can make a loop.
        Unknown slots and sessions are ignored, as Postgres does.
        """
        session = self.sessions.get((pid, secret))
        if session is not None:
            session.cancel()
            return
        slot, mine = slot_of(pid), self.slot_cell.slot
        if slot not in (NO_SLOT, mine):
            if origin != "client":
                log.info(
                    "cancel request for instance slot %d relayed to this instance (slot %d) "
                    "dropped: a relayed cancel request is never forwarded again",
                    slot,
                    mine,
                )
                return
            self._in_background(self._forward_to_instance(slot, pid, secret))
            return
        owner = worker_of(pid)
        if owner != self.worker and self.relay is not None and origin != "worker":
            self._in_background(self.relay.forward(owner, pid, secret))
            return
        log.info("cancel request for an unknown session ignored")

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        if len(self._forwards) >= MAX_FORWARDS:
            work.close()
            log.info("cancel request dropped: %d are being forwarded already", MAX_FORWARDS)
            return
        task = asyncio.get_running_loop().create_task(work)
        self._forwards.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._forwards.discard)

    async def _forward_to_instance(self, slot: int, pid: int, secret: int) -> None:
        address = await self.instances.address_of(slot)
        if address is None:
            log.info("cancel request for instance slot %d ignored: no live instance holds it", slot)
            return
        code = codec.RELAYED_CANCEL_REQUEST
        if await send_cancel(address, pid, secret, code, FORWARD_TIMEOUT):
            log.info("cancel request for instance slot %d forwarded to %s", slot, address)
        else:
            self.instances.forget(slot)

    def agent_label(self, agent_id: str) -> str:
        """Agent ids become a metric label only when the auth file bounds them (an agent
        that logs in with a delegation token instead is bounded only by what issuers sign)."""
        if self.settings.auth_mode == "scram" and agent_id in self.verifiers:
            return agent_id
        return "*"

    def _make_pools(self, policies: PolicySet) -> None:
        """One pool per agent type: its upstream role, its timeouts, its connection cap."""
        for policy in policies:
            if policy.name in self.pools:
                self.pools[policy.name].set_startup(self._startup_for(policy))
                continue
            settings = self.settings
            size_limit = ""
            if policy.max_server_connections:
                share = worker_share(policy.max_server_connections, settings.workers, self.worker)
                settings = settings.model_copy(update={"pool_size": share})
                size_limit = f"limits.max_server_connections of agent type {policy.name}"
            upstream = self.upstream
            password = role_password(policy.upstream_role, self.settings.upstream_credentials_dir)
            if password is not None:
                # least privilege all the way: log in as the agent type's own role
                upstream = upstream.model_copy(
                    update={"user": policy.upstream_role, "password": password}
                )
            self.pools[policy.name] = Pool(
                settings, upstream, self._startup_for(policy), size_limit=size_limit
            )

    def _startup_for(self, policy: AgentPolicy) -> dict[str, str]:
        """Startup settings of the type's server connections: its timeouts, and its role."""
        startup = dict(policy.upstream_settings())
        if role_password(policy.upstream_role, self.settings.upstream_credentials_dir) is None and (
            policy.upstream_role and policy.upstream_role != self.upstream.user
        ):
            startup["role"] = policy.upstream_role
        return startup

    async def check_schema(self) -> None:
        """Refuses to start when guardproxy's own schema is missing or older than this version."""
        head = SCHEMA_HEAD
        pool = self.pools["default"]
        server = await pool.acquire()
        try:
            # a missing privilege is named with the GRANT that adds it, never a traceback
            await check_login(
                server.query,
                self.policies or (),
                self.upstream.user,
                self.settings.upstream_credentials_dir,
            )
            rows = await server.query(
                "SELECT version_num FROM guardproxy.alembic_version"
                if await server.query(
                    "SELECT to_regclass('guardproxy.alembic_version') IS NOT NULL"
                )
                == [["t"]]
                else "SELECT NULL::text"
            )
        finally:
            pool.release(server)
        current = rows[0][0] if rows else None
        if current != head:
            raise ConfigError(
                f"the guardproxy schema in database {self.upstream.database} is at revision "
                f"{current or 'none'}, this guardproxy needs {head}: run "
                "`guardproxy db upgrade --upstream DSN` (as a role that may create the schema), then start again"
            )

    async def load_catalog(self) -> None:
        """Reads tables and columns from the upstream for star expansion and name resolution."""
        if self.judge is None:
            return
        pool = self.pools["default"]
        try:
            server = await pool.acquire()
        except GuardError as exc:
            log.warning(
                "could not read the catalog (will retry on the next DDL or reload): %s", exc.message
            )
            return
        try:
            rows = await server.query(CATALOG_QUERY)
            path_rows = await server.query(SEARCH_PATH_QUERY)
            key_rows = await server.query(FOREIGN_KEYS_QUERY)
        except (GuardError, ConnectionError) as exc:
            pool.discard(server)
            log.warning("could not read the catalog: %s", exc)
            return
        pool.release(server)
        path = _pg_array(path_rows[0][0]) if path_rows and path_rows[0][0] else ["public"]
        catalog = Catalog.from_rows(
            ((str(r[0]), str(r[1]), str(r[2]), r[3]) for r in rows),
            search_path=path,
            foreign_keys=(tuple(str(v) for v in r) for r in key_rows),  # type: ignore[misc]
        )
        self.judge.set_catalog(catalog)
        log.info("catalog loaded: %d relations", len(catalog.tables))

    def catalog_changed(self) -> None:
        """A DDL statement ran: reload the catalog soon, once, whatever the number of DDLs."""
        if self.judge is not None and (self._catalog_task is None or self._catalog_task.done()):
            self._catalog_task = asyncio.get_running_loop().create_task(self._reload_catalog_soon())

    async def _reload_catalog_soon(self) -> None:
        await asyncio.sleep(0.05)
        await self.load_catalog()

    @property
    def pool(self) -> Pool:
        return self.pools["default"]

    def pool_for(self, agent_type: str) -> Pool:
        return self.pools.get(agent_type) or self.pools["default"]

    def pool_views(self) -> list[PoolView]:
        return [PoolView(name, pool.snapshot) for name, pool in self.pools.items()]

    # ------------------------------------------------------------ operator actions

    def reload(self) -> str:
        """Re-reads the policies atomically: a broken set keeps the old one and says why."""
        if self.settings.policies is None:
            log.info("reload requested: no policies configured, nothing to reload")
            return "nothing to reload"
        try:
            policies = load_policy_set(self.settings.policies)
        except PolicyError as exc:
            log.error("reload refused, keeping the policies in force: %s", exc)
            return f"reload refused, old policies kept: {exc}"
        assert self.judge is not None
        judge = Judge(policies, self.judge.catalog)
        self.policies, self.judge = policies, judge
        self._make_pools(policies)
        if self.judge_workers is not None:
            self.judge_workers.restart()
        for session in self.sessions.values():
            session.policies_reloaded()
        log.info("policies reloaded: %s", ", ".join(p.name for p in policies))
        asyncio.get_running_loop().create_task(self.load_catalog())
        return f"reloaded {len(policies)} agent types"

    async def _enforce_transaction_timeouts(self) -> None:
        """transaction_timeout of the policies (Postgres 15 lacks it) and client_idle_timeout."""
        while True:
            await asyncio.sleep(0.25)
            now = time.perf_counter()
            idle_limit = self.settings.client_idle_timeout
            for session in list(self.sessions.values()):
                if (
                    idle_limit
                    and not session.busy
                    and now - session.last_activity > idle_limit
                    and not session.admin
                ):
                    session.kill(f"client idle for more than client_idle_timeout ({idle_limit:g}s)")
                    continue
                relay = session.relay
                judging = relay.judging if relay is not None else None
                if judging is None:
                    continue
                limit = judging.policy.transaction_timeout
                age = session.transaction_age(now)
                if limit is not None and age is not None and age > limit.total_seconds():
                    name = judging.policy.name
                    session.end_transaction(
                        GuardError(
                            f"transaction of {name} ran longer than transaction_timeout ({limit}) and was "
                            f"rolled back (policy {name}, timeouts.transaction_timeout)",
                            hint="keep transactions short: commit before thinking, then start a new one",
                            sqlstate="25P04",
                        )
                    )

    def auth_failed(self, source: str, agent_id: str) -> None:
        self.stats.auth_failures += 1
        self.login_limits.failed(source, agent_id)

    def check_auth_rate(self, source: str, agent_id: str) -> None:
        """Refuses a login its source, or its source and agent id together, failed too
        often recently (server/login_limits.py). The same answer whether the agent
        exists or not."""
        refusal = self.login_limits.refusal(source, agent_id)
        if refusal is not None:
            raise AuthFailed(refusal, sqlstate="28000")

    def sessions_of_type(self, agent_type: str) -> int:
        return sum(1 for s in self.sessions.values() if s.agent_type == agent_type)

    async def pause(self) -> None:
        """Stops lending servers and waits (up to shutdown_timeout) for lent ones to come back."""
        for pool in self.pools.values():
            pool.pause()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_timeout
        while loop.time() < deadline and any(p.active for p in self.pools.values()):
            await asyncio.sleep(0.02)

    def resume(self) -> None:
        for pool in self.pools.values():
            pool.resume()

    def kill_agent(self, agent_id: str) -> int:
        """Ends every session of ``agent_id``; their open transactions are rolled back."""
        killed = 0
        for session in list(self.sessions.values()):
            if session.agent_id == agent_id and not session.admin:
                session.kill(f"session ended by an operator (KILL AGENT {agent_id})")
                killed += 1
        return killed

    async def readiness(self) -> tuple[bool, str]:
        up = self.upstream
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(up.host, up.port), 2.0)
        except (OSError, TimeoutError) as exc:
            return False, f"upstream {up.host}:{up.port} unreachable: {exc}"
        writer.close()
        return True, "ready"

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(
            socket.AF_INET6 if ":" in self.settings.listen_host else socket.AF_INET
        )
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.settings.workers > 1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self.settings.listen_host, self.settings.listen_port))
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.bound_port = sock.getsockname()[1]
        if self.policies is not None:
            await self.check_schema()
        # the slot goes into every cancel key: decided before the first client is accepted
        await self._join_registry()
        # tokens are checked from the first client on
        await self._start_delegation()
        self._server = await loop.create_server(self.new_session, sock=sock, backlog=1024)
        if self.policies is not None:
            assert self.settings.upstream is not None
            self.audit = AuditLog(
                self.settings.upstream, self.stats, self.settings.audit_queue_size
            )
            self.audit.start()
        await self.load_catalog()
        if self.settings.workers > 1:
            self.relay = CancelRelay(
                Path(tempfile.gettempdir()),
                self.bound_port,
                self.worker,
                lambda pid, secret: self.cancel(pid, secret, "worker"),
            )
            await self.relay.start()
        self._timeouts = loop.create_task(self._enforce_transaction_timeouts())
        self._janitors = [loop.create_task(pool.janitor()) for pool in self.pools.values()]
        if self.settings.metrics_port is not None:
            self.ops = OpsServer(self.registry, self.readiness)
            # each worker has its own port: metrics_port + worker index
            port = self.settings.metrics_port + self.worker if self.settings.metrics_port else 0
            await self.ops.start(self.settings.metrics_host, port)
        log.info(
            "guardproxy listening on %s:%d, upstream %s@%s:%d/%s, pool_mode %s, hot path %s",
            self.settings.listen_host,
            self.bound_port,
            self.upstream.user,
            self.upstream.host,
            self.upstream.port,
            self.upstream.database,
            self.settings.pool_mode,
            native.hot_path(),
        )

    async def _join_registry(self) -> None:
        """Worker 0 claims the instance's slot and keeps it; the other workers wait for it."""
        if self.worker != 0:
            # bounded: the pool bounds connecting and waiting, each statement takes <= 5 s
            s = self.settings
            await self.slot_cell.wait_decided(2 * s.server_connect_timeout + 30.0)
            return
        address = await asyncio.to_thread(advertised_address, self.settings, self.bound_port)
        if is_loopback_address(address) and self.settings.listen_host not in (
            "127.0.0.1",
            "::1",
            "localhost",
        ):
            log.warning(
                "advertise address %s is a loopback address: instances on other hosts cannot "
                "forward cancel requests here; set advertise_address (GUARDPROXY_ADVERTISE_ADDRESS)",
                address,
            )
        self.instances.address = address
        await self.instances.start()
        self._registry_task = asyncio.get_running_loop().create_task(self.instances.keep_alive())

    async def serve_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stopping.set)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self._stopping.wait()
        await self.shutdown()

    def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def shutdown(self) -> None:
        log.info(
            "shutting down: no new connections, waiting up to %gs for clients",
            self.settings.shutdown_timeout,
        )
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_timeout
        while loop.time() < deadline and any(
            s.server is not None for s in list(self.sessions.values())
        ):
            await asyncio.sleep(0.05)
        for session in list(self.sessions.values()):
            if session.transport is not None:
                session.transport.close()
        if self._registry_task is not None:
            self._registry_task.cancel()
            # the sessions are gone: no cancel can be meant for this instance any more
            await self.instances.release()
        for pool in self.pools.values():
            pool.close_all()
        for janitor in self._janitors:
            janitor.cancel()
        self._timeouts.cancel()
        if self.relay is not None:
            self.relay.close()
        if self.ops is not None:
            self.ops.close()
        if self.audit is not None:
            await self.audit.close()
        if self.revocations is not None:
            await self.revocations.close()
        if self.judge_workers is not None:
            self.judge_workers.close()
        log.info("guardproxy stopped")


def _pg_array(text: str) -> list[str]:
    """A text[] as Postgres prints it, e.g. ``{public,"my schema"}``."""
    inner = text.strip("{}")
    return [part.strip('"') for part in inner.split(",") if part]


def role_password(role: str, directory: Path | None) -> str | None:
    """The password of an upstream role, from GUARDPROXY_ROLE_PASSWORD_<ROLE> or a file
    named after the role in ``upstream_credentials_dir`` (a mounted Kubernetes secret)."""
    env = os.environ.get("GUARDPROXY_ROLE_PASSWORD_" + re.sub(r"[^A-Za-z0-9]", "_", role).upper())
    if env:
        return env
    if directory is not None:
        path = directory / role
        if path.is_file():
            return path.read_text().strip()
    return None
