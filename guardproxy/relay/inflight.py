"""What the lent server still owes its client session, and the relay of its answers.

Every message the relay sends that gets an answer is recorded as an *expected
answer* (``Pending`` kind, visible or hidden, and a payload), in order. Answers
arrive in the same order: Postgres answers messages as it processes them, and
after an error in the extended protocol skips everything up to the next Sync.
``Inflight.feed`` reads the server's bytes, forwards what the client must see
(as raw spans of the server's own bytes wherever nothing changes), swallows the
answers to what the proxy sent for itself, and tells the relay about results,
errors and ReadyForQuery through ``Events``.

Results are counted per request, never per server: an ``Execution`` belongs to
one Query or one Execute of a portal, with its row cap, what the portal or
cursor delivered before, and an audit record to complete when it ends.
"""

from __future__ import annotations

import struct
from collections import deque
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Final, Protocol

from guardproxy.pool.backend import POOL_APP_NAME
from guardproxy.protocol import codec
from guardproxy.protocol import messages as m
from guardproxy.protocol.errors import ProtocolViolation

if TYPE_CHECKING:
    from guardproxy.pool.backend import BackendState
    from guardproxy.relay.registry import Statement, Undo

_I32 = struct.Struct("!i")
_MAX_SERVER_MESSAGE: Final = 1 << 30
# A DataRow or CopyData larger than this is streamed to the client as it arrives
# rather than buffered whole: a 500 MB row costs no 500 MB here.
STREAM_ABOVE: Final = 1 << 16


class Pending(IntEnum):
    PARSE = 1  # payload: Sent (the server statement name is forgotten if it fails)
    BIND = 2  # payload: Sent (a stale plan marks the server statement stale)
    DESCRIBE = 3  # payload: True, or a Sent with no_rows: a RowDescription answered as NoData
    EXECUTE = 4  # payload: Execution or None
    CLOSE = 5
    SYNC = 6
    # payload: Execution or None; ends at ReadyForQuery. Bytes: the proxy answers this
    # Query itself and sent an empty one in its place; its EmptyQueryResponse becomes them
    QUERY = 7
    SYNTH = 8  # payload: bytes the proxy answers itself, in order
    ABORT = 9  # the proxy's failing Parse; payload: the error the client sees instead


# kind, visible, payload, and the registry change to undo if the server does not take
# the message (it fails, or comes after an error and before the Sync)
Expected = tuple[Pending, bool, Any, "Undo | None"]
_ENDS_ROUND = (Pending.SYNC, Pending.QUERY)


class Sent:
    """A Parse, Bind or Describe as sent: the statement's name on the server and the
    client's (errors name the client's), the length of the tag before the client's
    text (a Parse error's position leaves it out), and the client's statement record;
    for a Describe, whether its rows are hidden from the client (``no_rows``); for a
    Parse of the unnamed statement, which client statement the server's unnamed one
    was before it (``unnamed_before``: a Parse the server skips leaves that one)."""

    __slots__ = (
        "client_name",
        "no_rows",
        "server_name",
        "shift",
        "statement",
        "unnamed_before",
    )

    def __init__(
        self,
        server_name: bytes,
        client_name: bytes,
        shift: int = 0,
        statement: Statement | None = None,
        no_rows: bool = False,
        unnamed_before: int = 0,
    ) -> None:
        self.server_name: Final = server_name
        self.client_name: Final = client_name
        self.shift: Final = shift
        self.statement: Final = statement
        self.no_rows: Final = no_rows
        self.unnamed_before: Final = unnamed_before


class Execution:
    """One request whose result the relay watches: a Query or an Execute.

    A result is cut past ``cap`` rows or ``byte_cap`` bytes of row data (the payload
    of its DataRow or CopyData messages). A portal or a cursor (``source``) carries
    what earlier executions delivered, so a cap holds over all of them; a Query of
    several statements counts each statement's result on its own (``sources`` names
    the cursor of each, if any).
    """

    __slots__ = (
        "audit",
        "byte_cap",
        "bytes",
        "cap",
        "cap_error",
        "cut",
        "cut_by",
        "delivered",
        "extended",
        "failed",
        "failure",
        "index",
        "offset",
        "refused",
        "rows",
        "shift",
        "source",
        "sources",
        "started",
        "written",
    )

    def __init__(
        self,
        shift: int = 0,
        cap: int = 0,
        cap_error: bool = False,
        source: Any = None,
        audit: Any = None,
        extended: bool = False,
        byte_cap: int = 0,
        sources: tuple[Any, ...] = (),
    ) -> None:
        self.shift = shift  # the tag prefix: error positions move back by this much
        self.cap = cap  # limits.max_rows_returned, 0 for none
        self.byte_cap = byte_cap  # limits.max_bytes_returned, 0 for none
        self.cap_error = cap_error
        self.sources = sources
        self.index = 0  # the statement of a Query whose result comes now
        self.source = sources[0] if sources else source
        self.offset = self.rows = self.bytes = self.delivered = 0
        # what the portal or cursor delivered before is read when this result starts,
        # not now: Executes pipelined in one round each start where the last one ended
        self.started = False
        self.cut = False  # rows past the cap were dropped
        self.cut_by = ""  # "rows" or "bytes": the cap that cut
        self.refused = False  # a statement of it was refused past its cap (error mode)
        self.audit = audit  # the relay's record of an unmanaged write, completed at the end
        self.extended = extended  # an Execute (else a Query)
        self.failed = False
        self.failure = ""  # SQLSTATE and message of the error that ended it
        self.written = 0  # rows its statements changed

    def _start(self) -> None:
        source = self.source
        self.offset = self.rows = source.rows if source is not None else 0
        self.bytes = source.bytes if source is not None else 0
        self.delivered = 0  # rows of this result that went out
        self.started = True

    def counts(self) -> bool:
        return bool(self.cap or self.byte_cap)

    def take_row(self, size: int) -> bool:
        """Counts one row of ``size`` payload bytes; False when it passes a cap (drop it)."""
        if self.cut:
            return False
        if not self.started:
            self._start()
        self.rows += 1
        self.bytes += size
        if self.cap and self.rows > self.cap:
            self.cut, self.cut_by = True, "rows"
            return False
        if self.byte_cap and self.bytes > self.byte_cap:
            self.cut, self.cut_by = True, "bytes"
            return False
        self.delivered += 1
        return True

    def result_done(self) -> None:
        """A result ended (CommandComplete, PortalSuspended): its source keeps the counts;
        a Query's next statement counts anew."""
        source = self.source
        if not self.started:
            self._start()  # a result without rows: the source's counts stay
        if source is not None:
            source.rows, source.bytes = self.rows, self.bytes
        if not self.extended:
            self.index += 1
            self.source = self.sources[self.index] if self.index < len(self.sources) else None
            self._start()
            self.cut = False


class Events(Protocol):
    def on_complete(self, tag: bytes, execution: Execution | None) -> None: ...
    def on_error(self, fields: dict[str, str], kind: Pending, payload: Any) -> bytes | None: ...
    def on_cut(self, execution: Execution, tag: bytes) -> bytes: ...
    def on_ready(self, status: bytes) -> None: ...
    def on_query_done(self, execution: Execution) -> None: ...
    def on_not_taken(self, entries: list[Expected], failed: bool) -> None: ...
    def notification_pid(self, pid: int) -> int: ...


class Inflight:
    """The expected answers of one session's lent server, and the loop over its bytes."""

    __slots__ = (
        "_buf",
        "_through",
        "_through_forward",
        "backend",
        "events",
        "login_app_name",
        "out",
        "pending",
        "rounds_done",
        "rounds_sent",
        "skipping",
    )

    def __init__(self, events: Events, out: list[bytes]) -> None:
        self.events = events
        self.out = out  # bytes for the client
        self.pending: deque[Expected] = deque()
        self.skipping = False  # the server skips everything up to the next Sync
        self.rounds_sent = 0  # Syncs and Queries sent (for the registry's portals)
        self.rounds_done = 0  # ... and answered with ReadyForQuery
        self.backend: BackendState | None = None
        self._buf = b""
        self._through = 0  # bytes still to come of a large message being streamed
        self._through_forward = True  # forwarded (or dropped: a row past the cap)
        # what a RESET of application_name shows the client: its own startup value, as
        # Postgres would, not the pool's
        self.login_app_name = b""

    # ------------------------------------------------------------ recording

    def expect(
        self, kind: Pending, visible: bool = True, payload: Any = None, undo: Undo | None = None
    ) -> None:
        """Records that a message just sent (or a synthetic answer) awaits its turn."""
        if self.skipping:
            # the server discards everything after an error until Sync: no answers come
            if kind != Pending.SYNC:
                if undo is not None:
                    self.events.on_not_taken([(kind, visible, payload, undo)], False)
                return
            self.skipping = False
        if kind == Pending.SYNTH and not self.pending:
            if visible and payload:
                self.out.append(payload)
            return
        if kind == Pending.SYNC or kind == Pending.QUERY:
            self.rounds_sent += 1
        self.pending.append((kind, visible, payload, undo))

    def hide_round_end(self) -> None:
        """The ReadyForQuery of the next Sync is the proxy's own: not forwarded."""
        pending = self.pending
        if pending and pending[0][0] == Pending.SYNC:
            pending[0] = (Pending.SYNC, False, None, None)

    def rounds(self) -> int:
        """ReadyForQuery messages still owed (one per Sync and per Query)."""
        return sum(1 for entry in self.pending if entry[0] in _ENDS_ROUND)

    @property
    def mid_message(self) -> bool:
        """Part of a large message has been streamed to the client, the rest not yet."""
        return self._through > 0

    def reset(self) -> None:
        """The server is gone: nothing more will come."""
        self.pending.clear()
        self.skipping = False
        self._buf = b""
        self._through = 0

    # ------------------------------------------------------------ receiving

    def feed(self, data: bytes) -> None:
        """Relays the server's bytes: forwards, counts, swallows, and tells the relay."""
        out = self.out
        if self._through:
            take = min(self._through, len(data))
            self._through -= take
            if self._through_forward:
                out.append(data[:take] if take < len(data) else data)
            if take == len(data):
                return
            data = data[take:]
        buf = self._buf + data if self._buf else data
        pending = self.pending
        unpack = _I32.unpack_from
        n = len(buf)
        pos = start = 0
        while n - pos >= 5:
            kind = buf[pos]
            length = unpack(buf, pos + 1)[0]
            if length < 4 or length > _MAX_SERVER_MESSAGE:
                raise ProtocolViolation(f"server sent a message with length {length}")
            end = pos + 1 + length
            head = pending[0] if pending else None
            if end > n:
                if (
                    end - pos > STREAM_ABOVE
                    and (kind == m.BE_DATA_ROW or kind == m.BE_COPY_DATA)
                    and (head is None or head[1])
                ):
                    keep = self._count_row(head, end - pos - 5)
                    if not keep:
                        if start < pos:
                            out.append(buf[start:pos])
                        start = n
                    pos = n
                    self._through, self._through_forward = end - n, keep
                break
            visible = head is None or head[1]
            if kind == m.BE_DATA_ROW and visible:  # the hot path: forwarded as is
                if (
                    head is not None
                    and head[2] is not None
                    and not self._count_row(head, end - pos - 5)
                ):
                    if start < pos:  # past the policy's cap: cut here
                        out.append(buf[start:pos])
                    start = end
                pos = end
                continue
            replacement = self._on_message(kind, buf, pos, end, head)
            if replacement is not None:
                if start < pos:
                    out.append(buf[start:pos])
                if replacement:
                    out.append(replacement)
                start = end
            pos = end
            # synthetic answers waiting at the front go out right after this message
            if pending and pending[0][0] == Pending.SYNTH:
                if start < pos:
                    out.append(buf[start:pos])
                start = pos
                while pending and pending[0][0] == Pending.SYNTH:
                    synth = pending.popleft()
                    if synth[1] and synth[2]:
                        out.append(synth[2])
        self._buf = buf[pos:] if pos < n else b""
        if start < pos:
            out.append(buf[start:pos])

    def _count_row(self, head: Expected | None, size: int) -> bool:
        """Counts one row of the running result; False when it passes a cap (drop it)."""
        if head is None:
            return True
        execution = head[2]
        if not isinstance(execution, Execution) or not execution.counts():
            return True
        return execution.take_row(size)

    def _on_message(
        self, kind: int, buf: bytes, pos: int, end: int, head: Expected | None
    ) -> bytes | None:
        """Tracks one server message. Returns None to forward it as is, b"" to drop it,
        or the bytes to send the client instead."""
        pending = self.pending
        visible = head is None or head[1]
        keep: bytes | None = None if visible else b""
        if kind == m.BE_READY:
            status = buf[pos + 5 : pos + 6]
            backend = self.backend
            if backend is not None:
                backend.status = status
            while pending:
                entry = pending.popleft()
                if entry[0] in _ENDS_ROUND:
                    self.rounds_done += 1
                    keep = None if entry[1] else b""
                    execution = entry[2]
                    if entry[0] == Pending.QUERY and isinstance(execution, Execution):
                        if execution.refused:
                            keep = self._cut_ready(execution, status, keep)
                        if execution.audit is not None:
                            self.events.on_query_done(execution)
                    break
            else:
                keep = None
            self.events.on_ready(status)
            return keep
        if kind == m.BE_COMMAND_COMPLETE:
            execution = (
                head[2]
                if head is not None and head[0] in (Pending.EXECUTE, Pending.QUERY)
                else None
            )
            if head is not None and head[0] == Pending.EXECUTE:
                pending.popleft()
            tag = buf[pos + 5 : end - 1]
            if isinstance(execution, Execution):
                if execution.cut and visible:
                    execution.refused = execution.cap_error
                    keep = self.events.on_cut(execution, tag)
                execution.result_done()
            if visible:
                self.events.on_complete(tag, execution)
            return keep
        if kind == m.BE_NOTICE and visible and head is not None:
            execution = head[2]
            if isinstance(execution, Execution) and execution.byte_cap:
                fields = codec.error_fields(buf[pos:end])
                cut = within_bytes(fields, execution.byte_cap)
                return None if cut is None else codec.build_error_fields(cut, b"N")
            return keep
        if kind == m.BE_ERROR:
            return self._on_error(buf[pos:end], head)
        if kind in (m.BE_PARSE_COMPLETE, m.BE_BIND_COMPLETE, m.BE_CLOSE_COMPLETE, m.BE_NO_DATA):
            if head is not None:
                pending.popleft()
            return keep
        if kind == m.BE_PORTAL_SUSPENDED or kind == m.BE_EMPTY_QUERY:
            if head is not None and head[0] == Pending.QUERY and isinstance(head[2], bytes):
                return head[2]  # the proxy's own answer to a Query it answered itself
            if head is not None and head[0] == Pending.EXECUTE:
                pending.popleft()
                execution = head[2]
                if isinstance(execution, Execution):
                    execution.result_done()
            return keep
        if kind == m.BE_ROW_DESCRIPTION:
            if head is not None and head[0] == Pending.DESCRIBE:
                pending.popleft()
                described = head[2]
                if isinstance(described, Sent):
                    described = described.no_rows
                if described and visible:
                    return codec.message(b"n")  # the agent's statement returns no rows
            return keep
        if kind == m.BE_COPY_DATA:
            if (
                visible
                and head is not None
                and head[2] is not None
                and not self._count_row(head, end - pos - 5)
            ):
                return b""
            return keep
        if kind == m.BE_PARAMETER_STATUS:
            name, value = codec.parameter_status(buf[pos:end])
            if self.backend is not None:
                self.backend.params[name] = value
            if name == "application_name" and value == POOL_APP_NAME and visible:
                return codec.message(b"S", b"application_name\x00" + self.login_app_name + b"\x00")
            return keep
        if kind == m.BE_NOTIFICATION:
            (pid,) = _I32.unpack_from(buf, pos + 5)
            mapped = self.events.notification_pid(pid)
            if mapped == pid:
                return None
            return buf[pos : pos + 5] + _I32.pack(mapped) + buf[pos + 9 : end]
        return keep

    def _on_error(self, raw: bytes, head: Expected | None) -> bytes | None:
        fields = codec.error_fields(raw)
        if fields.get("S") in ("FATAL", "PANIC"):
            if self.backend is not None:
                self.backend.fatal = fields
            return b""  # reported to the client when the connection drops
        pending = self.pending
        if head is None:
            self.events.on_error(fields, Pending.SYNC, None)
            return None
        kind, visible, payload, _ = head
        out: bytes | None = None
        if kind == Pending.ABORT:
            out = payload  # the proxy's own error, in place of the server's syntax error
        elif not visible and kind == Pending.QUERY:
            out = b""  # the proxy's own statement failed: logged by the relay
        elif isinstance(payload, Execution):
            if payload.byte_cap:
                cut = within_bytes(fields, payload.byte_cap)
                if cut is not None:
                    fields, out = cut, codec.build_error_fields(cut)
            if payload.shift and "P" in fields:
                fields = without_tag(fields, payload.shift)
                out = codec.build_error_fields(fields)
        told = self.events.on_error(fields, kind, payload)
        if told is not None and kind != Pending.ABORT and (visible or kind != Pending.QUERY):
            out = told
        if kind != Pending.QUERY:
            # extended protocol: the server skips everything up to the next Sync, a
            # Query included; what it never took is reported (the first one failed)
            not_taken = []
            while pending and pending[0][0] != Pending.SYNC:
                not_taken.append(pending.popleft())
            if not pending:
                self.skipping = True
            if not_taken:
                self.events.on_not_taken(not_taken, True)
        return out

    def _cut_ready(self, execution: Execution, status: bytes, keep: bytes | None) -> bytes | None:
        """A capped Query refused in error mode: the client's transaction ends aborted."""
        if status != b"T" or keep == b"":
            return keep
        return codec.ready_for_query(b"E")


# what an error or notice says that a statement chose: the whole of a value can be in it
# ('invalid input syntax for type integer: "<a table aggregated into text>"')
_TEXT_FIELDS: Final = ("M", "D", "W", "H")
_CUT_MARK: Final = " [cut by guardproxy: limits.max_bytes_returned]"


def within_bytes(fields: dict[str, str], limit: int) -> dict[str, str] | None:
    """An error's or notice's fields with their text cut to ``limit`` bytes in all, as a
    row is (None: nothing to cut): result data must not leave as an error's text."""
    sizes = [len(fields.get(code, "").encode()) for code in _TEXT_FIELDS]
    if sum(sizes) <= limit:
        return None
    budget = max(limit - len(_CUT_MARK), 0)
    changed = dict(fields)
    for code, size in zip(_TEXT_FIELDS, sizes, strict=True):
        if code not in changed:
            continue
        if size <= budget:
            budget -= size
            continue
        kept = changed[code].encode()[:budget].decode(errors="ignore")
        changed[code] = kept + _CUT_MARK if code == "M" or kept else ""
        budget = 0
        if not changed[code]:
            del changed[code]
    return changed


def without_tag(fields: dict[str, str], shift: int) -> dict[str, str]:
    """The error's fields with its position moved back past the proxy's tag prefix."""
    try:
        position = int(fields["P"]) - shift
    except ValueError:
        return fields
    changed = dict(fields)
    if position > 0:
        changed["P"] = str(position)
    else:
        del changed["P"]
    return changed
