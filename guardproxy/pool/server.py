"""One connection to the upstream Postgres: login, response tracking, forwarding.

A server connection is in one of two modes:

* internal: no client attached; the pool or a session drives it with
  ``startup()`` / ``query()`` and reads the answers here;
* attached: lent to one client session; every byte from the server is
  forwarded to that client as raw spans, except responses to messages the proxy
  injected itself (replayed settings, statements prepared on this server for
  the client), which are swallowed.

To know which response belongs to which request, every message sent while
attached is recorded in ``pending`` (one entry per message that gets an
answer) and popped when its answer arrives, the way the server itself
processes them: in order, and after an error in the extended protocol it skips
everything up to the next Sync.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Protocol, cast

from guardproxy.config import Upstream
from guardproxy.protocol import codec
from guardproxy.protocol.errors import ProtocolViolation, UpstreamError
from guardproxy.protocol.scram import MECHANISM, ClientExchange, md5_password

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

log = logging.getLogger("guardproxy.server")

# pending entry kinds
PARSE, BIND, CLOSE, DESCRIBE, EXECUTE, SYNC, QUERY, SYNTH = range(1, 9)
_ENDS_ROUND = (SYNC, QUERY)
# data of a QUERY entry whose error goes to the client but whose ReadyForQuery does
# not: a denial raised by the server in the middle of an extended-protocol round.
KEEP_ERROR_ONLY = b"keep-error"
# data of a swallowed QUERY entry the proxy sends to abort the client's transaction
# after refusing a result (limits.max_rows_returned with on_rows_returned_over: error)
ABORTS_TRANSACTION = b"abort"
ABORT_SQL = (
    "DO $guardproxy$BEGIN RAISE EXCEPTION 'guardproxy aborted this transaction: a result "
    "passed limits.max_rows_returned' USING ERRCODE = '54000'; END$guardproxy$"
)

_I32 = struct.Struct("!i")
_MAX_SERVER_MESSAGE = 1 << 30
# A DataRow or CopyData larger than this is streamed to the client as it arrives
# rather than buffered whole: a 500 MB row costs no 500 MB here.
_STREAM_ABOVE = 1 << 16

# Servers sent to during the event-loop callback now running, when that callback is a
# batch (a client's or a server's data_received): each gets one write at its end,
# with no call_soon per server. Outside a batch, send() schedules the write itself.
_batch: list[ServerConn] | None = None


def begin_batch() -> bool:
    """Starts collecting writes; True when this call opened the batch (and must end it)."""
    global _batch
    if _batch is not None:
        return False
    _batch = []
    return True


def end_batch() -> None:
    """Writes what the batch collected, one write per server."""
    global _batch
    servers, _batch = _batch, None
    for server in servers or ():
        try:
            server._flush()
        except Exception:  # one broken transport must not keep the others from writing
            server._flush_pending = False
            log.exception("writing to server %s failed", server.serial)


class Client(Protocol):
    """What a server connection needs from the client session it is lent to."""

    def write(self, data: bytes) -> None: ...
    def writelines(self, chunks: Iterable[bytes]) -> None: ...
    def server_idle(self) -> None: ...
    def server_lost(self, reason: UpstreamError) -> None: ...
    def server_tag(self, tag: bytes) -> None: ...
    def server_error(self, fields: dict[str, str]) -> None: ...
    def rows_truncated(self, cap: int) -> None: ...
    def round_finished(self) -> None: ...
    def pause_client_reading(self, pause: bool) -> None: ...


class ServerConn(asyncio.Protocol):
    def __init__(self, upstream: Upstream, serial: int) -> None:
        self.upstream = upstream
        self.serial = serial
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None
        self.pending: deque[tuple[int, bool, bytes | None]] = deque()
        self.skip_until_sync = False
        self.status = b"I"
        self.params: dict[str, str] = {}
        self.backend_pid = 0
        self.backend_secret = 0
        self.prepared: dict[
            bytes, int
        ] = {}  # server statement name -> generation it was prepared at
        self.to_close: set[bytes] = set()
        self.generation = (
            0  # the pool's startup settings it was made with  # stale: close before preparing again
        )
        self.on_stale: Callable[[bytes], None] | None = None  # set by the pool
        self.settings_key: tuple[tuple[str, str], ...] | None = None
        self.app_name: str | None = None  # application_name the proxy set on it
        self.row_cap = 0  # max_rows_returned of the statements now running (0: none)
        self.row_cap_error = False  # refuse rather than truncate
        self.rows_seen = 0
        self.rows_offset = 0  # rows a cursor delivered before this FETCH (counted into the cap)
        self.abort_round = False  # a result was refused: the transaction must end aborted
        self.hold_rounds = 0  # rounds to answer before the held client may send again
        self.created_at = time.monotonic()
        self.last_used = self.created_at
        self.closed = False
        self.fatal: dict[str, str] | None = None
        self._buf = b""
        self._through = 0  # bytes still to come of a large message being streamed
        self._through_forward = True  # forwarded (or dropped: a row past the cap)
        self._wbuf: list[bytes] = []
        self._flush_pending = False
        self._inbox: deque[tuple[int, bytes]] = deque()
        self._inbox_waiter: asyncio.Future[None] | None = None
        self._lost: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(
            asyncio.Transport, transport
        )  # uvloop's transports are not subclasses
        # kept: asyncio.get_running_loop() costs a getpid() system call on every send
        self._loop = asyncio.get_running_loop()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self._lost = exc or ConnectionResetError("server closed the connection")
        self._wake()
        client, self.client = self.client, None
        if client is not None:
            client.server_lost(self._lost_error())

    def _lost_error(self) -> UpstreamError:
        if self.fatal:
            return UpstreamError(
                f"server connection lost: {self.fatal.get('M', 'terminated')}",
                sqlstate=self.fatal.get("C", "08006"),
                hint="guardproxy: the server connection ended; any open transaction was rolled back. Retry.",
            )
        return UpstreamError(
            f"server connection lost ({self._lost})",
            hint="guardproxy: the server connection ended; any open transaction was rolled back. Retry.",
        )

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause_client_reading(True)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.pause_client_reading(False)

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

    # ------------------------------------------------------------ sending

    def send(self, data: bytes) -> None:
        """Queues bytes for the server; they leave in one write when the current callback ends.

        A client's batch of messages (Parse/Bind/Describe/Execute/Sync) thus costs one
        system call instead of one per message.
        """
        self._wbuf.append(data)
        if not self._flush_pending:
            self._flush_pending = True
            if _batch is not None:
                _batch.append(self)
            else:
                (self._loop or asyncio.get_running_loop()).call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        chunks, self._wbuf = self._wbuf, []
        if chunks and self.transport is not None and not self.closed:
            self.transport.write(b"".join(chunks) if len(chunks) > 1 else chunks[0])

    def expect(self, kind: int, swallow: bool = False, data: bytes | None = None) -> None:
        """Records that a message just sent (or a synthetic answer) awaits its turn."""
        if self.skip_until_sync:
            # The server discards everything after an error until Sync: no answers come.
            if kind != SYNC:
                return
            self.skip_until_sync = False
        if kind == SYNTH and not self.pending:
            if self.client is not None and data:
                self.client.write(data)
            return
        self.pending.append((kind, swallow, data))

    @property
    def idle(self) -> bool:
        return not self.pending and self.status == b"I"

    # ------------------------------------------------------------ receiving

    def data_received(self, data: bytes) -> None:
        if self.client is None:
            self._receive_internal(data)
            return
        opened = begin_batch()  # a client released here may send on to another server
        try:
            self._relay_to_client(data)
        finally:
            if opened:
                end_batch()

    def _relay_to_client(self, data: bytes) -> None:
        client = self.client
        assert client is not None
        if self._through:
            take = min(self._through, len(data))
            self._through -= take
            if self._through_forward:
                client.write(data[:take] if take < len(data) else data)
            if take == len(data):
                return
            data = data[take:]
        buf = self._buf + data if self._buf else data
        pending = self.pending
        unpack = _I32.unpack_from
        n = len(buf)
        pos = start = 0
        out: list[bytes] = []
        row_cap = self.row_cap
        released = finished = False
        while n - pos >= 5:
            kind = buf[pos]
            end = pos + 1 + unpack(buf, pos + 1)[0]
            if end > n:
                if end - pos > _STREAM_ABOVE and kind in (68, 100) and not self._swallowing():
                    keep = True
                    if kind == 68 and row_cap:
                        self.rows_seen += 1
                        keep = self.rows_seen <= row_cap
                    if not keep:
                        if start < pos:
                            out.append(buf[start:pos])
                        start = n
                    pos = n
                    self._through, self._through_forward = end - n, keep
                break
            swallow = bool(pending) and pending[0][1]
            if kind == 68 and not swallow:  # DataRow: the hot path, forwarded as is
                if row_cap:
                    self.rows_seen += 1
                    if self.rows_seen > row_cap:  # past the policy's cap: cut here
                        if start < pos:
                            out.append(buf[start:pos])
                        start = end
                pos = end
                continue
            if kind == 67 and row_cap and self.rows_seen > row_cap:
                # the statement returned more than the cap: say so, and count only what was sent
                if start < pos:
                    out.append(buf[start:pos])
                start = end
                out.append(self._cap_message(buf[pos + 5 : end - 1]))
            if kind in (67, 69):
                self.rows_seen = self.rows_offset = 0
            forward = self._on_message(kind, buf, pos, end, swallow)
            if kind == 90 and self.abort_round and forward:
                self.abort_round = False
                if self.status == b"T":
                    # As after any error, the client's transaction is aborted: the next
                    # statement gets 25P02, and only a ROLLBACK ends it.
                    if start < pos:
                        out.append(buf[start:pos])
                    start = end
                    out.append(codec.ready_for_query(b"E"))
                    self.send(codec.build_query(ABORT_SQL))
                    self.expect(QUERY, swallow=True, data=ABORTS_TRANSACTION)
            if not forward:
                if start < pos:
                    out.append(buf[start:pos])
                start = end
            pos = end
            # Synthetic answers waiting at the front go out right after this message.
            if pending and pending[0][0] == SYNTH:
                out.append(buf[start:pos])
                start = pos
                while pending and pending[0][0] == SYNTH:
                    synth = pending.popleft()[2]
                    if synth:
                        out.append(synth)
            if kind == 90:
                if self.hold_rounds:
                    self.hold_rounds -= 1
                    finished = not self.hold_rounds
                if not pending and self.status == b"I":
                    released = True
        self._buf = buf[pos:] if pos < n else b""
        if start < pos:
            out.append(buf[start:pos])
        if out:
            client.writelines(out)
        if released and self.client is client:
            client.server_idle()
        if finished:
            client.round_finished()

    @property
    def mid_message(self) -> bool:
        """Part of a large message has been streamed to the client, the rest not yet."""
        return self._through > 0

    def _swallowing(self) -> bool:
        return bool(self.pending) and self.pending[0][1]

    def _cap_message(self, tag: bytes) -> bytes:
        cap = self.row_cap
        if self.client is not None:
            self.client.rows_truncated(cap)
        if self.row_cap_error:
            self.abort_round = True
            return codec.build_error(
                "54000",
                f"the result has more than {cap} rows, the most this agent may read at once "
                "(policy limits.max_rows_returned)",
                hint=f"add a LIMIT of at most {cap}, aggregate, or page through the rows",
            )
        notice = codec.build_notice(
            "01000",
            f"result truncated to {cap} rows by policy (limits.max_rows_returned)",
            severity="WARNING",
            hint=f"add a LIMIT of at most {cap}, aggregate, or page through the rows",
        )
        if tag.startswith(b"FETCH"):
            # the cap holds for the cursor: what earlier FETCHes delivered counts
            return notice + codec.build_command_complete(f"FETCH {max(cap - self.rows_offset, 0)}")
        return notice + codec.build_command_complete(f"SELECT {cap}")

    def _on_message(self, kind: int, buf: bytes, pos: int, end: int, swallow: bool) -> bool:
        """Tracks one server message; returns whether to forward it to the client."""
        pending = self.pending
        if kind == 90:  # ReadyForQuery
            self.status = buf[pos + 5 : pos + 6]
            while pending:
                entry = pending.popleft()
                if entry[0] in _ENDS_ROUND:
                    return not entry[1] and entry[2] is not KEEP_ERROR_ONLY
            return True
        if kind in (
            49,
            50,
            51,
            110,
            115,
        ):  # ParseComplete BindComplete CloseComplete NoData PortalSuspended
            if pending:
                pending.popleft()
            return not swallow
        if kind == 84:  # RowDescription
            if pending and pending[0][0] == DESCRIBE:
                pending.popleft()
            return not swallow
        if kind in (67, 73):  # CommandComplete, EmptyQueryResponse
            if pending and pending[0][0] == EXECUTE:
                pending.popleft()
            if kind == 67 and not swallow and self.client is not None:
                self.client.server_tag(buf[pos + 5 : end - 1])
            return not swallow
        if kind == 69:  # ErrorResponse
            fields = codec.error_fields(buf[pos:end])
            if fields.get("S") in ("FATAL", "PANIC"):
                self.fatal = fields
                return False  # reported to the client when the connection drops
            if self.client is not None and not swallow:
                self.client.server_error(fields)
            if pending and pending[0][0] != QUERY:
                failed = pending[0]
                if failed[0] == PARSE and failed[2]:
                    self.prepared.pop(failed[2], None)
                elif (
                    failed[0] == BIND and failed[2] and fields.get("C") == "0A000" and self.on_stale
                ):
                    # "cached plan must not change result type": every copy of it is stale
                    self.on_stale(failed[2])
                while pending and pending[0][0] not in _ENDS_ROUND:
                    pending.popleft()
                if not pending:
                    self.skip_until_sync = True
                return True
            if swallow and not (pending and pending[0][2] is ABORTS_TRANSACTION):
                log.warning("replaying session state failed: %s", fields.get("M"))
            return not swallow
        if kind == 83:  # ParameterStatus
            name, value = codec.parameter_status(buf[pos:end])
            self.params[name] = value
            return not swallow
        return not swallow

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
            self._inbox.append((buf[pos], buf[pos:end]))
            pos = end
        self._buf = buf[pos:]
        if self._inbox_waiter is None and self._inbox:
            # Nobody is reading: an idle pooled server only speaks to say it is going away.
            for kind, raw in self._inbox:
                if kind == 69:
                    self.fatal = codec.error_fields(raw)
                    log.info(
                        "idle server %s closed by upstream: %s", self.serial, self.fatal.get("M")
                    )
                    self.abort()
                elif kind == 83:
                    name, value = codec.parameter_status(raw)
                    self.params[name] = value
            self._inbox.clear()
        self._wake()

    def _wake(self) -> None:
        waiter = self._inbox_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def recv(self) -> tuple[int, bytes]:
        """Next message in internal mode."""
        while not self._inbox:
            if self.closed:
                raise self._lost_error()
            self._inbox_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._inbox_waiter
            finally:
                self._inbox_waiter = None
        return self._inbox.popleft()

    # ------------------------------------------------------------ internal use

    async def startup(self, extra: dict[str, str] | None = None) -> None:
        up = self.upstream
        params = {"user": up.user, "database": up.database, "application_name": "guardproxy"}
        params.update(extra or {})
        self.send(codec.build_startup(params))
        scram: ClientExchange | None = None
        while True:
            kind, raw = await self.recv()
            if kind == 82:  # 'R'
                code = codec.auth_code(raw)
                if code == 0:
                    continue
                if up.password is None:
                    raise UpstreamError(
                        f"upstream {up.host}:{up.port} asks for a password for role {up.user!r} "
                        "and the upstream DSN has none",
                        sqlstate="28P01",
                    )
                if code == 3:
                    self.send(codec.build_password(up.password.encode() + b"\x00"))
                elif code == 5:
                    self.send(
                        codec.build_password(
                            md5_password(up.user, up.password, raw[9:13]) + b"\x00"
                        )
                    )
                elif code == 10:
                    if MECHANISM.encode() not in raw[9:].split(b"\x00"):
                        raise UpstreamError("upstream offers no SASL mechanism guardproxy speaks")
                    scram = ClientExchange(up.user, up.password)
                    self.send(codec.build_sasl_initial(MECHANISM, scram.first()))
                elif code == 11 and scram is not None:
                    self.send(codec.build_password(scram.final(raw[9:])))
                elif code == 12 and scram is not None:
                    scram.verify(raw[9:])
                else:
                    raise UpstreamError(
                        f"upstream asked for unsupported authentication (code {code})"
                    )
            elif kind == 83:
                name, value = codec.parameter_status(raw)
                self.params[name] = value
            elif kind == 75:  # BackendKeyData
                self.backend_pid, self.backend_secret = struct.unpack_from("!ii", raw, 5)
            elif kind == 69:
                f = codec.error_fields(raw)
                raise UpstreamError(
                    f"upstream {up.host}:{up.port} refused the login of role {up.user!r}: {f.get('M')}",
                    sqlstate=f.get("C", "08006"),
                )
            elif kind == 90:
                self.status = raw[5:6]
                return

    async def query(self, sql: str) -> list[list[str | None]]:
        """Runs SQL in internal mode; returns the rows of the last result, raises on error."""
        self.send(codec.build_query(sql))
        rows: list[list[str | None]] = []
        error: dict[str, str] | None = None
        while True:
            kind, raw = await self.recv()
            if kind == 68:
                rows.append(_data_row(raw))
            elif kind == 84:
                rows = []
            elif kind == 69:
                error = codec.error_fields(raw)
                if error.get("S") in ("FATAL", "PANIC"):
                    self.fatal = error
            elif kind == 83:
                name, value = codec.parameter_status(raw)
                self.params[name] = value
            elif kind == 71:  # CopyInResponse: refuse
                self.send(codec.message(b"f", b"internal query cannot COPY\x00"))
            elif kind == 90:
                self.status = raw[5:6]
                if error is not None:
                    raise UpstreamError(
                        error.get("M", "internal query failed"), sqlstate=error.get("C")
                    )
                return rows

    async def exchange(self, data: bytes) -> list[tuple[int, bytes]]:
        """Sends a client's request in internal mode; returns every answer up to ReadyForQuery."""
        self.send(data)
        answers: list[tuple[int, bytes]] = []
        while True:
            kind, raw = await self.recv()
            answers.append((kind, raw))
            if kind == 83:
                name, value = codec.parameter_status(raw)
                self.params[name] = value
            elif kind == 71:  # COPY FROM STDIN cannot be managed: fail it, the client is told
                self.send(
                    codec.message(
                        b"f", b"guardproxy cannot run COPY FROM STDIN as a managed write\x00"
                    )
                )
            elif kind == 90:
                self.status = raw[5:6]
                return answers


def _data_row(raw: bytes) -> list[str | None]:
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
