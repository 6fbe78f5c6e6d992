"""Server connections to one upstream role: opening, lending, taking back, closing.

A server returns to the idle list only when it is clean: ReadyForQuery idle,
nothing pending, not pinned. Anything else is closed, never reused. Waiters
are served first come, first served; a waiter that waited ``reserve_pool_timeout``
may open one of ``reserve_pool_size`` extra connections; nobody waits longer
than ``pool_acquire_timeout`` (then PoolTimeout, SQLSTATE 53300).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
from collections import deque
from typing import TYPE_CHECKING

from guardproxy.config import Settings, Upstream
from guardproxy.pool.backend import Backend
from guardproxy.pool.upstream_tls import upstream_context
from guardproxy.protocol import codec
from guardproxy.protocol.errors import PoolTimeout, UpstreamError

if TYPE_CHECKING:
    from guardproxy.analysis.catalog import Catalog
    from guardproxy.policy.plans import PlanEstimate

log = logging.getLogger("guardproxy.pool")


class Pool:
    def __init__(
        self,
        settings: Settings,
        upstream: Upstream,
        startup: dict[str, str] | None = None,
        size_limit: str = "",
    ) -> None:
        self.settings = settings
        # what bounds pool_size, named in the error of a client that waited too long
        self.size_limit = size_limit or "pool_size (guardproxy settings)"
        self.upstream = upstream
        # settings every server connection starts with (role, policy timeouts): startup
        # parameters, so RESET and DISCARD ALL return to them rather than drop them
        self.startup_options = _options(startup)
        self.agent_role = (startup or {}).get("role")
        self.idle: deque[Backend] = deque()
        self.servers: set[Backend] = set()
        self.opening = 0
        self.waiters: deque[asyncio.Future[Backend]] = deque()
        self.params_cache: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
        # (agent type, statement shape) -> (catalog, plan estimates): see server.plancheck
        self.plan_estimates: dict[tuple[str, str], tuple[Catalog, tuple[PlanEstimate, ...]]] = {}
        self.serial = 0
        self.closing = False
        # counters, read by metrics and the admin console
        self.acquired_total = 0
        self.wait_seconds_total = 0.0
        self.timeouts_total = 0
        self.connect_errors_total = 0
        self.tls_context = upstream_context(upstream.sslmode, upstream.sslrootcert)
        self.pinned = 0  # sessions pinned to a server now
        self.paused = False
        self.generation = 0  # bumped when the startup settings change
        self._resumed = asyncio.Event()

    @property
    def size(self) -> int:
        return len(self.servers) + self.opening

    @property
    def active(self) -> int:
        return len(self.servers) - len(self.idle)

    def snapshot(self) -> dict[str, float]:
        return {
            "clients_active": float(self.active),
            "clients_waiting": float(len(self.waiters)),
            "servers_active": float(self.active),
            "servers_idle": float(len(self.idle)),
            "servers_max": float(self.settings.pool_size),
            "pinned": float(self.pinned),
            "acquired": float(self.acquired_total),
            "wait_seconds": self.wait_seconds_total,
            "acquire_timeouts": float(self.timeouts_total),
            "connect_errors": float(self.connect_errors_total),
        }

    # ------------------------------------------------------------ lending

    def try_acquire(self) -> Backend | None:
        """Fast path with no await: an idle, healthy server if there is one."""
        if self.paused:
            return None
        now = time.monotonic()
        lifetime = self.settings.server_lifetime
        while self.idle:
            server = self.idle.pop()  # most recently used: warm caches, lets others idle out
            if server.closed:
                self.servers.discard(server)
                continue
            if lifetime and now - server.created_at > lifetime:
                self._close(server)
                continue
            self.acquired_total += 1
            return server
        return None

    async def acquire(self) -> Backend:
        if self.paused:
            try:
                # asyncio.timeout, not wait_for: a cancel that comes as the pool resumes is
                # never lost
                async with asyncio.timeout(self.settings.pool_acquire_timeout):
                    await self._resumed.wait()
            except TimeoutError:
                self.timeouts_total += 1
                raise PoolTimeout(
                    "guardproxy is paused by an operator and did not resume within "
                    f"{self.settings.pool_acquire_timeout:g}s",
                    hint="Retry later; the operator resumes the pool with RESUME.",
                ) from None
        server = self.try_acquire()
        if server is not None:
            return server
        if self.closing:
            raise UpstreamError("guardproxy is shutting down", sqlstate="57P01")
        if self.size < self.settings.pool_size:
            server = await self._open()
            self.acquired_total += 1
            return server
        return await self._wait()

    async def _wait(self) -> Backend:
        s = self.settings
        loop = asyncio.get_running_loop()
        started = loop.time()
        waiter: asyncio.Future[Backend] = loop.create_future()
        self.waiters.append(waiter)
        handed = False
        try:
            reserve_at = s.reserve_pool_timeout if s.reserve_pool_size else None
            deadline = started + s.pool_acquire_timeout
            if reserve_at is not None and reserve_at < s.pool_acquire_timeout:
                done, _ = await asyncio.wait({waiter}, timeout=reserve_at)
                if not done and self.size < s.pool_size + s.reserve_pool_size:
                    self.waiters.remove(waiter)
                    waiter.cancel()
                    log.info("opening a reserve connection after %.1fs of waiting", reserve_at)
                    server = await self._open()
                    self.acquired_total += 1
                    return server
            remaining = deadline - loop.time()
            try:
                server = await asyncio.wait_for(asyncio.shield(waiter), max(remaining, 0))
            except TimeoutError:
                self.timeouts_total += 1
                raise PoolTimeout(
                    f"no server connection became free within {s.pool_acquire_timeout:g}s: "
                    f"all {self.size} connections to {self.upstream.user}@{self.upstream.database} "
                    f"are busy ({s.pool_size} is the limit, set by {self.size_limit}) and "
                    f"{len(self.waiters)} clients are waiting",
                    hint="Retry after a short pause; keep transactions short and do not hold them "
                    f"open while thinking; an operator can raise {self.size_limit.split(' ')[0]}.",
                ) from None
            self.acquired_total += 1
            handed = True
            return server
        finally:
            self.wait_seconds_total += loop.time() - started
            if waiter in self.waiters:
                self.waiters.remove(waiter)
            if not waiter.done():
                waiter.cancel()
            elif not handed and not waiter.cancelled() and waiter.exception() is None:
                # A server arrived just as we gave up (timeout or cancel): give it back.
                self.release(waiter.result())

    def release(self, server: Backend) -> None:
        """Takes a server back. Only a clean one is reused."""
        server.client = None
        stale = server.pool_generation != self.generation
        if server.closed or server.status != b"I" or self.closing or stale:
            self._close(server)
            self._open_for_waiter()
            return
        if server.transport is not None:
            server.transport.resume_reading()
        server.last_used = time.monotonic()
        while self.waiters and not self.paused:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(server)
                return
        self.idle.append(server)

    def set_startup(self, startup: dict[str, str]) -> None:
        """New startup settings (a reload changed the policy): servers made with the old ones go."""
        options = _options(startup)
        if options == self.startup_options:
            return
        self.startup_options = options
        self.agent_role = startup.get("role")
        self.generation += 1
        for server in list(self.idle):
            self._close(server)

    def mark_stale(self, name: bytes) -> None:
        """A prepared statement's plan went stale: every server re-prepares it on next use."""
        for server in self.servers:
            if server.prepared.pop(name, None) is not None:
                server.to_close.add(name)

    def pause(self) -> None:
        self.paused = True
        self._resumed.clear()

    def resume(self) -> None:
        self.paused = False
        self._resumed.set()
        while self.waiters and self.idle:
            server = self.idle.pop()
            self.release(server)

    def discard(self, server: Backend) -> None:
        """A server that is broken or dirty: close it and let a waiter open a fresh one."""
        server.client = None
        self._close(server)
        self._open_for_waiter()

    def _close(self, server: Backend) -> None:
        self.servers.discard(server)
        with contextlib.suppress(ValueError):
            self.idle.remove(server)
        server.close()

    def _open_for_waiter(self) -> None:
        if self.waiters and self.size < self.settings.pool_size and not self.closing:
            asyncio.get_running_loop().create_task(self._open_and_hand_over())

    async def _open_and_hand_over(self) -> None:
        try:
            server = await self._open()
        except UpstreamError as exc:
            log.warning("%s", exc.message)
            return
        self.release(server)

    # ------------------------------------------------------------ opening

    async def _open(self) -> Backend:
        up = self.upstream
        self.opening += 1
        self.serial += 1
        serial = self.serial
        try:
            try:
                server = await asyncio.wait_for(
                    self._connect(serial), self.settings.server_connect_timeout
                )
                extra = {"options": self.startup_options} if self.startup_options else None
                await asyncio.wait_for(
                    server.startup(extra, self.settings.upstream_allow_cleartext),
                    self.settings.server_connect_timeout,
                )
            except TimeoutError:
                self.connect_errors_total += 1
                raise UpstreamError(
                    f"upstream {up.host}:{up.port} did not answer within "
                    f"{self.settings.server_connect_timeout:g}s",
                    hint="Check that Postgres is up; guardproxy reconnects by itself when it is back.",
                ) from None
            except OSError as exc:
                self.connect_errors_total += 1
                raise UpstreamError(
                    f"cannot connect to upstream {up.host}:{up.port}: {_reason(exc)}",
                    hint="Check that Postgres is up; guardproxy reconnects by itself when it is back.",
                ) from None
            except UpstreamError:
                self.connect_errors_total += 1
                raise
        finally:
            self.opening -= 1
        server.pool_generation = self.generation
        server.agent_role = self.agent_role
        self.servers.add(server)
        log.debug("opened server connection %d (backend pid %d)", serial, server.backend_pid)
        return server

    async def _connect(self, serial: int) -> Backend:
        """A TCP connection to the upstream, over TLS when its sslmode asks (SSLRequest first)."""
        up = self.upstream
        loop = asyncio.get_running_loop()
        context = self.tls_context
        if context is None:
            _, server = await loop.create_connection(lambda: Backend(up, serial), up.host, up.port)
            return server
        infos = await loop.getaddrinfo(up.host, up.port, type=socket.SOCK_STREAM)
        family, type_, proto, _, address = infos[0]
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            await loop.sock_sendall(sock, codec.SSL_REQUEST_PACKET)
            answer = await loop.sock_recv(sock, 1)
        except OSError:
            sock.close()
            raise
        if answer == b"S":
            _, server = await loop.create_connection(
                lambda: Backend(up, serial), sock=sock, ssl=context, server_hostname=up.host
            )
            return server
        if up.sslmode in ("allow", "prefer"):
            _, server = await loop.create_connection(lambda: Backend(up, serial), sock=sock)
            return server
        sock.close()
        raise UpstreamError(
            f"upstream {up.host}:{up.port} does not offer TLS, and the upstream DSN says sslmode={up.sslmode}",
            hint="enable ssl on the server, or lower sslmode in the upstream DSN",
        )

    # ------------------------------------------------------------ upkeep

    async def cancel(self, server: Backend) -> None:
        """Asks Postgres to cancel what ``server`` runs now (a separate connection, as the protocol says)."""
        up = self.upstream
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(up.host, up.port), self.settings.server_connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            log.warning("cannot send cancel to upstream: %s", exc)
            return
        writer.write(codec.build_cancel(server.backend_pid, server.backend_secret))
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    def expire_idle(self) -> None:
        s, now = self.settings, time.monotonic()
        for server in list(self.idle):
            too_idle = s.server_idle_timeout and now - server.last_used > s.server_idle_timeout
            too_old = s.server_lifetime and now - server.created_at > s.server_lifetime
            if too_idle or too_old or server.closed:
                self._close(server)

    async def janitor(self) -> None:
        while not self.closing:
            await asyncio.sleep(1.0)
            self.expire_idle()

    def close_all(self) -> None:
        self.closing = True
        for server in list(self.servers):
            self._close(server)
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(UpstreamError("guardproxy is shutting down", sqlstate="57P01"))


def _options(startup: dict[str, str] | None) -> str:
    """Settings as a startup ``options`` string (spaces and backslashes escaped)."""
    return " ".join(
        f"-c {k}={v.replace(chr(92), chr(92) * 2).replace(' ', chr(92) + ' ')}"
        for k, v in (startup or {}).items()
    )


def _reason(exc: OSError) -> str:
    """What went wrong, in words: TLS errors as they are, socket errors by their errno."""
    if isinstance(exc, ssl.SSLError) or not exc.errno:
        return str(exc)
    return os.strerror(exc.errno)
