"""One connection to the upstream Postgres (a *backend*): login, internal queries, forwarding.

A backend is in one of two modes:

* internal: no client session attached; the pool or a job drives it with
  ``startup()`` / ``query()`` / ``recv()`` and reads every answer here;
* attached: lent to one client session, which gets every byte the server sends
  (``Attached.backend_data``) and decides what reaches its client. Nothing about
  the client's statements or results is kept here.

``BackendState`` is the part the relay reads and updates without I/O: the
transaction status, which statements are prepared on this server, the settings
and application_name it carries. Tests build one without a socket.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import deque
from typing import Protocol, cast

from guardproxy.config import Upstream
from guardproxy.pool.upstream_auth import UpstreamAuth, tls_server_end_point
from guardproxy.protocol import codec
from guardproxy.protocol import messages as m
from guardproxy.protocol.errors import ProtocolViolation, UpstreamError

log = logging.getLogger("guardproxy.backend")

_I32 = struct.Struct("!i")
_MAX_SERVER_MESSAGE = 1 << 30
LOST_HINT = "guardproxy: the server connection ended; any open transaction was rolled back. Retry."

Settings = tuple[tuple[str, str], ...]


# application_name of the pool's servers at startup: a RESET brings them back to it
POOL_APP_NAME = "guardproxy"


class BackendState:
    """What the relay knows about a server connection, without its socket."""

    def __init__(self, serial: int = 0) -> None:
        self.serial = serial
        self.status = b"I"  # of the last ReadyForQuery: I idle, T in a transaction, E failed
        self.params: dict[str, str] = {}  # ParameterStatus values the server reported
        self.backend_pid = 0
        self.backend_secret = 0
        # server statement name -> generation of the client Parse it was prepared for
        self.prepared: dict[bytes, int] = {}
        self.to_close: set[bytes] = set()  # prepared here but stale: close before preparing
        # generation of the client statement that is the unnamed statement here; 0 when
        # it may be anyone's (another session's, or dropped by a Query of the proxy's own)
        self.unnamed = 0
        self.own_statements: set[bytes] = set()  # the proxy's own (jobs), prepared here
        self.pool_generation = 0  # the pool's startup settings it was made with
        # the role the agent's statements run as (``role=`` at start), if not the login's
        self.agent_role: str | None = None
        self.settings_key: Settings | None = None  # the client settings it carries now
        self.app_name: str | None = None  # application_name the proxy set on it
        # guard.principals / guard.task / guard.token_id as the proxy last set them here
        # (None: unknown, set them before the next statement of a delegated session)
        self.guard_sent: dict[str, str] | None = None
        self.created_at = time.monotonic()
        self.last_used = self.created_at
        self.closed = False
        self.fatal: dict[str, str] | None = None  # a FATAL the server sent before closing

    def forget_statements(self) -> None:
        """DISCARD ALL / DEALLOCATE ALL ran here: no prepared statement survives but those
        pipelined after it, which the relay cannot tell apart: each is closed (harmless
        when it is gone) before it is prepared again."""
        self.to_close.update(self.prepared)
        self.prepared.clear()
        self.own_statements.clear()

    def send(self, data: bytes) -> None:  # pragma: no cover - overridden by Backend
        raise NotImplementedError


class Attached(Protocol):
    """What a backend needs from the client session it is lent to."""

    def backend_data(self, data: bytes) -> None: ...
    def backend_lost(self, reason: UpstreamError) -> None: ...
    def pause_client_reading(self, pause: bool) -> None: ...


class Backend(BackendState, asyncio.Protocol):
    def __init__(self, upstream: Upstream, serial: int) -> None:
        BackendState.__init__(self, serial)
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.client: Attached | None = None
        self._buf = b""
        self._inbox: deque[tuple[int, bytes]] = deque()
        self._inbox_waiter: asyncio.Future[None] | None = None
        self._lost: BaseException | None = None
        self._stash: list[bytes] = []  # notifications that came while a job had the server
        self.last_client_pid = 0  # the process id the last client it was lent to knows

    # ------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self._lost = exc or ConnectionResetError("server closed the connection")
        self._wake()
        client, self.client = self.client, None
        if client is not None:
            client.backend_lost(self.lost_error())

    def lost_error(self) -> UpstreamError:
        if self.fatal:
            return UpstreamError(
                f"server connection lost: {self.fatal.get('M', 'terminated')}",
                sqlstate=self.fatal.get("C", "08006"),
                hint=LOST_HINT,
            )
        return UpstreamError(f"server connection lost ({self._lost})", hint=LOST_HINT)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause_client_reading(True)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.pause_client_reading(False)

    def pause_reading(self, pause: bool) -> None:
        """Backpressure from the client: stop (or go on) reading this server."""
        if self.transport is not None and not self.closed:
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            try:
                self.transport.write(codec.TERMINATE)
            finally:
                self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    # ------------------------------------------------------------ receiving

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is not None:
            client.backend_data(data)
        else:
            self._receive_internal(data)

    def _receive_internal(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos, n = 0, len(buf)
        while n - pos >= 5:
            length = _I32.unpack_from(buf, pos + 1)[0]
            if length < 4 or length > _MAX_SERVER_MESSAGE:
                self._lost = ProtocolViolation(f"server sent a message with length {length}")
                self.abort()
                return
            end = pos + 1 + length
            if end > n:
                break
            if buf[pos] == m.BE_NOTIFICATION:
                # for the client, not for the job reading: handed over when it is done
                self._stash.append(buf[pos:end])
            else:
                self._inbox.append((buf[pos], buf[pos:end]))
            pos = end
        self._buf = buf[pos:]
        if self._inbox_waiter is None and self._inbox:
            # Nobody is reading: an idle pooled server only speaks to say it is going away.
            for kind, raw in self._inbox:
                if kind == m.BE_ERROR:
                    self.fatal = codec.error_fields(raw)
                    log.info(
                        "idle server %s closed by upstream: %s", self.serial, self.fatal.get("M")
                    )
                    self.abort()
                elif kind == m.BE_PARAMETER_STATUS:
                    name, value = codec.parameter_status(raw)
                    self.params[name] = value
            self._inbox.clear()
        self._wake()

    def take_stashed(self) -> list[bytes]:
        """Notifications received in internal mode, for the client the server is lent to."""
        stashed, self._stash = self._stash, []
        return stashed

    def _wake(self) -> None:
        waiter = self._inbox_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def recv(self) -> tuple[int, bytes]:
        """Next message in internal mode."""
        while not self._inbox:
            if self.closed:
                raise self.lost_error()
            self._inbox_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._inbox_waiter
            finally:
                self._inbox_waiter = None
        return self._inbox.popleft()

    # ------------------------------------------------------------ internal use

    async def startup(
        self, extra: dict[str, str] | None = None, allow_cleartext: bool = False
    ) -> None:
        """Logs in (``UpstreamAuth`` checks every step, the server's proof included) and
        reads the server's parameters, up to its first ReadyForQuery."""
        up = self.upstream
        params = {"user": up.user, "database": up.database, "application_name": POOL_APP_NAME}
        params.update(extra or {})
        self.send(codec.build_startup(params))
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        auth = UpstreamAuth(
            up.user,
            up.password,
            where=f"{up.host}:{up.port}",
            tls=ssl_object is not None,
            allow_cleartext=allow_cleartext,
            channel_binding=tls_server_end_point(ssl_object),
        )
        while True:
            kind, raw = await self.recv()
            if kind == m.BE_AUTHENTICATION:
                reply = auth.receive(raw)
                if reply is not None:
                    self.send(reply)
                continue
            if kind == m.BE_ERROR:
                f = codec.error_fields(raw)
                raise UpstreamError(
                    f"upstream {up.host}:{up.port} refused the login of role {up.user!r}: {f.get('M')}",
                    sqlstate=f.get("C", "08006"),
                )
            auth.check_authenticated(kind)  # nothing else may come before AuthenticationOk
            if kind == m.BE_PARAMETER_STATUS:
                name, value = codec.parameter_status(raw)
                self.params[name] = value
            elif kind == m.BE_BACKEND_KEY:
                self.backend_pid, self.backend_secret = struct.unpack_from("!ii", raw, 5)
            elif kind == m.BE_READY:
                self.status = raw[5:6]
                return

    async def query(self, sql: str) -> list[list[str | None]]:
        """Runs SQL in internal mode; returns the rows of the last result, raises on error."""
        self.send(codec.build_query(sql))
        self.unnamed = 0  # a Query drops the unnamed statement
        rows: list[list[str | None]] = []
        error: dict[str, str] | None = None
        while True:
            kind, raw = await self.recv()
            if kind == m.BE_DATA_ROW:
                rows.append(data_row(raw))
            elif kind == m.BE_ROW_DESCRIPTION:
                rows = []
            elif kind == m.BE_ERROR:
                error = codec.error_fields(raw)
                if error.get("S") in ("FATAL", "PANIC"):
                    self.fatal = error
            elif kind == m.BE_PARAMETER_STATUS:
                name, value = codec.parameter_status(raw)
                self.params[name] = value
            elif kind == m.BE_COPY_IN:  # refuse
                self.send(codec.message(b"f", b"internal query cannot COPY\x00"))
            elif kind == m.BE_READY:
                self.status = raw[5:6]
                if error is not None:
                    raise UpstreamError(
                        error.get("M", "internal query failed"), sqlstate=error.get("C")
                    )
                return rows

    async def exchange(
        self, data: bytes, until_ready: bool = True, copy_in: CopyIn | None = None
    ) -> list[tuple[int, bytes]]:
        """Sends messages in internal mode; returns every answer up to ReadyForQuery (or, with
        ``until_ready=False``, up to the first CommandComplete, EmptyQueryResponse or error).
        A COPY FROM STDIN takes its data from ``copy_in`` (the client), or is failed."""
        self.send(data)
        self.unnamed = 0  # what a job sends may replace or drop the unnamed statement
        answers: list[tuple[int, bytes]] = []
        while True:
            kind, raw = await self.recv()
            if kind == m.BE_COPY_IN:
                if copy_in is None:
                    self.send(
                        codec.message(b"f", b"guardproxy cannot run this COPY FROM STDIN\x00")
                    )
                else:
                    await self._copy_from_client(raw, copy_in)
                if not until_ready:
                    # extended protocol: the COPY's CommandComplete waits for a Flush
                    self.send(codec.FLUSH)
                continue
            answers.append((kind, raw))
            if kind == m.BE_PARAMETER_STATUS:
                name, value = codec.parameter_status(raw)
                self.params[name] = value
            elif kind == m.BE_READY:
                self.status = raw[5:6]
                return answers
            elif not until_ready and kind in (
                m.BE_COMMAND_COMPLETE,
                m.BE_EMPTY_QUERY,
                m.BE_ERROR,
                m.BE_PORTAL_SUSPENDED,
            ):
                return answers

    async def _copy_from_client(self, response: bytes, copy_in: CopyIn) -> None:
        """The client's COPY data, relayed to the server up to its CopyDone or CopyFail."""
        copy_in.to_client(response)
        while True:
            kind, raw = await copy_in.from_client()
            if kind in (m.FE_COPY_DATA, m.FE_COPY_DONE, m.FE_COPY_FAIL):
                self.send(raw)
                if kind != m.FE_COPY_DATA:
                    return
            elif kind not in (m.FE_FLUSH, m.FE_SYNC):  # Postgres ignores these during COPY
                why = f"message type {chr(kind)!r} in the middle of COPY FROM STDIN"
                self.send(codec.message(b"f", why.encode() + b"\x00"))
                return


class CopyIn(Protocol):
    """Where a COPY FROM STDIN run inside a job gets its data: the client."""

    def to_client(self, raw: bytes) -> None: ...
    async def from_client(self) -> tuple[int, bytes]: ...


def data_row(raw: bytes) -> list[str | None]:
    (count,) = struct.unpack_from("!h", raw, 5)
    pos = 7
    values: list[str | None] = []
    for _ in range(count):
        (length,) = _I32.unpack_from(raw, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(raw[pos : pos + length].decode())
            pos += length
    return values
