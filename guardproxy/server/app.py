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

from prometheus_client import CollectorRegistry

from guardproxy.config import Settings, Upstream
from guardproxy.metrics import GuardproxyCollector, PoolView, StatsRegistry
from guardproxy.pool.pool import Pool
from guardproxy.protocol.scram import Verifier, load_verifiers
from guardproxy.server.http import OpsServer
from guardproxy.server.session import ClientSession

log = logging.getLogger("guardproxy")


class Proxy:
    def __init__(self, settings: Settings, upstream: Upstream) -> None:
        self.settings = settings
        self.upstream = upstream
        self.pool = Pool(settings, upstream)
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
        if session is None:
            log.info("cancel request for an unknown session ignored")
            return
        session.cancel()

    def agent_label(self, agent_id: str) -> str:
        """Agent ids become a metric label only when the auth file bounds them."""
        return agent_id if self.settings.auth_mode == "scram" else "*"

    def pool_views(self) -> list[PoolView]:
        return [PoolView("default", self.pool.snapshot)]

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
        sock.bind((self.settings.listen_host, self.settings.listen_port))
        sock.setblocking(False)
        self._server = await loop.create_server(self.new_session, sock=sock, backlog=1024)
        self.bound_port = sock.getsockname()[1]
        self._janitor = loop.create_task(self.pool.janitor())
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
        self.pool.close_all()
        self._janitor.cancel()
        if self.ops is not None:
            self.ops.close()
        log.info("guardproxy stopped")
