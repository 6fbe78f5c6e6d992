"""The proxy process: listener, registry of sessions (for cancel), lifecycle.

Lifecycle follows startup / serve / shutdown: SIGTERM stops accepting, lets
clients finish for up to ``shutdown_timeout`` seconds, then closes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry

from guardproxy.config import Settings, Upstream
from guardproxy.metrics import GuardproxyCollector, PoolView, StatsRegistry
from guardproxy.pool.pool import Pool
from guardproxy.protocol.scram import Verifier, load_verifiers
from guardproxy.server.http import OpsServer
from guardproxy.server.session import ClientSession
from guardproxy.server.workers import CancelRelay, worker_of

log = logging.getLogger("guardproxy")


class Proxy:
    def __init__(self, settings: Settings, upstream: Upstream, worker: int = 0) -> None:
        self.settings = settings
        self.worker = worker
        self.relay: CancelRelay | None = None
        self.upstream = upstream
        self.pools: dict[str, Pool] = {"default": Pool(settings, upstream)}
        self.verifiers: dict[str, Verifier] = (
            load_verifiers(settings.auth_file) if settings.auth_file is not None else {}
        )
        self.sessions: dict[tuple[int, int], ClientSession] = {}
        self.clients = 0
        self.auth_failures_total = 0
        self.stats = StatsRegistry()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GuardproxyCollector(self.stats, self.pool_views))
        self.ops: OpsServer | None = None
        self._server: asyncio.AbstractServer | None = None
        self._stopping: asyncio.Event | None = None
        self.bound_port = settings.listen_port

    # ------------------------------------------------------------ sessions

    def new_session(self) -> ClientSession:
        self.clients += 1
        return ClientSession(self)

    def at_client_limit(self) -> bool:
        return self.clients > self.settings.max_client_conn

    def register(self, session: ClientSession) -> None:
        self.sessions[session.cancel_key] = session

    def forget(self, session: ClientSession) -> None:
        self.clients -= 1
        if self.sessions.get(session.cancel_key) is session:
            del self.sessions[session.cancel_key]

    def cancel(self, pid: int, secret: int) -> None:
        session = self.sessions.get((pid, secret))
        owner = worker_of(pid)
        if session is None and owner != self.worker and self.relay is not None:
            asyncio.get_running_loop().create_task(self.relay.forward(owner, pid, secret))
            return
        if session is None:
            log.info("cancel request for an unknown session ignored")
            return
        session.cancel()

    def agent_label(self, agent_id: str) -> str:
        """Agent ids become a metric label only when the auth file bounds them."""
        return agent_id if self.settings.auth_mode == "scram" else "*"

    @property
    def pool(self) -> Pool:
        return self.pools["default"]

    def pool_for(self, agent_type: str) -> Pool:
        return self.pools.get(agent_type) or self.pools["default"]

    def pool_views(self) -> list[PoolView]:
        return [PoolView(name, pool.snapshot) for name, pool in self.pools.items()]

    # ------------------------------------------------------------ operator actions

    def reload(self) -> str:
        """Re-reads what can change without a restart. Overridden as policies come in."""
        log.info("reload requested: nothing to reload")
        return "nothing to reload"

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
        sock.bind((self.settings.listen_host, self.settings.listen_port))
        sock.setblocking(False)
        self._server = await loop.create_server(self.new_session, sock=sock, backlog=1024)
        self.bound_port = sock.getsockname()[1]
        if self.settings.workers > 1:
            self.relay = CancelRelay(
                Path(tempfile.gettempdir()), self.bound_port, self.worker, self.cancel
            )
            await self.relay.start()
        self._janitors = [loop.create_task(pool.janitor()) for pool in self.pools.values()]
        if self.settings.metrics_port is not None:
            self.ops = OpsServer(self.registry, self.readiness)
            await self.ops.start(self.settings.metrics_host, self.settings.metrics_port)
        log.info(
            "guardproxy listening on %s:%d, upstream %s@%s:%d/%s, pool_mode %s",
            self.settings.listen_host,
            self.bound_port,
            self.upstream.user,
            self.upstream.host,
            self.upstream.port,
            self.upstream.database,
            self.settings.pool_mode,
        )

    async def serve_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stopping.set)
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
        for pool in self.pools.values():
            pool.close_all()
        for janitor in self._janitors:
            janitor.cancel()
        if self.relay is not None:
            self.relay.close()
        if self.ops is not None:
            self.ops.close()
        log.info("guardproxy stopped")
