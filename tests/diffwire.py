"""Protocol scripts for the differential tests, and a raw client that sends them.

A *script* is what one client sends on one fresh connection: a list of batches,
each a list of steps. A step is a frontend message (``Query``, ``Parse``, ``Bind``,
``Describe``, ``Execute``, ``Close``, ``Flush``, ``Sync``, ``CopyData``,
``CopyDone``, ``CopyFail``) or a harness action (``Steal``, ``Give``: another
client takes, then gives back, the server this client used last; see diffrun.py).
Every step's ``repr`` is the Python that builds it, so a failing script printed by
hypothesis can be pasted into an ``@example``.

``Conn.exchange`` writes a batch's messages in one go, then reads the answers and
attributes each to the message it answers, following Postgres' own rules
(``src/backend/tcop/postgres.c``): an error in an extended-protocol message makes
the server ignore everything up to the next Sync (a Query too); a Query or Execute
of ``COPY ... FROM STDIN`` takes the CopyData / CopyDone / CopyFail after it;
COPY messages outside a COPY are ignored; Flush is never answered. Each batch must
end with a Sync, a Query or a Flush, so that the server sends what it has.
Every read is bounded: a target that does not answer gets a ``TIMEOUT`` answer and
the rest of its script is not sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
from dataclasses import dataclass, field

import scramp

from guardproxy.protocol import codec

READ_TIMEOUT = float(__import__("os").environ.get("DIFF_READ_TIMEOUT", "10"))
TIMEOUT = b"!timeout"  # pseudo message kinds of an answer that never came
CLOSED = b"!closed"

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")


# ---------------------------------------------------------------- steps


@dataclass(frozen=True)
class Query:
    sql: str

    def raw(self) -> bytes:
        return codec.build_query(self.sql)


@dataclass(frozen=True)
class Parse:
    name: str
    sql: str
    types: tuple[int, ...] = ()

    def raw(self) -> bytes:
        tail = _I16.pack(len(self.types)) + b"".join(struct.pack("!I", t) for t in self.types)
        return codec.build_parse(self.name.encode(), self.sql.encode(), tail)


@dataclass(frozen=True)
class Bind:
    portal: str
    statement: str
    params: tuple[str | None, ...] = ()

    def raw(self) -> bytes:
        values = b"".join(
            _I32.pack(-1) if v is None else _I32.pack(len(v.encode())) + v.encode()
            for v in self.params
        )
        body = (
            codec.cstr(self.portal)
            + codec.cstr(self.statement)
            + _I16.pack(0)  # every parameter in text format
            + _I16.pack(len(self.params))
            + values
            + _I16.pack(0)  # every result column in text format
        )
        return codec.message(b"B", body)


@dataclass(frozen=True)
class Describe:
    target: str  # "S" or "P"
    name: str

    def raw(self) -> bytes:
        return codec.message(b"D", self.target.encode() + codec.cstr(self.name))


@dataclass(frozen=True)
class Close:
    target: str  # "S" or "P"
    name: str

    def raw(self) -> bytes:
        return codec.message(b"C", self.target.encode() + codec.cstr(self.name))


@dataclass(frozen=True)
class Execute:
    portal: str
    max_rows: int = 0

    def raw(self) -> bytes:
        return codec.message(b"E", codec.cstr(self.portal) + _I32.pack(self.max_rows))


@dataclass(frozen=True)
class Sync:
    def raw(self) -> bytes:
        return codec.SYNC


@dataclass(frozen=True)
class Flush:
    def raw(self) -> bytes:
        return codec.FLUSH


@dataclass(frozen=True)
class CopyData:
    data: str

    def raw(self) -> bytes:
        return codec.message(b"d", self.data.encode())


@dataclass(frozen=True)
class CopyDone:
    def raw(self) -> bytes:
        return codec.message(b"c")


@dataclass(frozen=True)
class CopyFail:
    why: str = "the client gave up"

    def raw(self) -> bytes:
        return codec.message(b"f", codec.cstr(self.why))


@dataclass(frozen=True)
class Steal:
    """Harness: another client takes the server this one gave back last (the pool lends
    the most recently used one), so this one continues on another server."""

    def raw(self) -> bytes:
        return b""


@dataclass(frozen=True)
class Give:
    """Harness: the other client gives back what it took."""

    def raw(self) -> bytes:
        return b""


Message = Query | Parse | Bind | Describe | Close | Execute | Sync | Flush
Step = Message | CopyData | CopyDone | CopyFail | Steal | Give
Batch = tuple[Step, ...]
Script = tuple[Batch, ...]
_COPY_STEPS = (CopyData, CopyDone, CopyFail)
# what makes the server send what it has (a COPY's end is followed by its Sync or Query)
_FLUSHING = (Sync, Query, Flush, CopyDone, CopyFail, Steal, Give)


# ---------------------------------------------------------------- answers


@dataclass
class Answer:
    """What the server sent in answer to step ``step`` of a batch: (kind, body) pairs."""

    step: int
    msgs: list[tuple[bytes, bytes]] = field(default_factory=list)


@dataclass
class Transcript:
    """One script's run on one target."""

    login: list[tuple[bytes, bytes]] = field(default_factory=list)
    batches: list[list[Answer]] = field(default_factory=list)
    broken: str = ""  # why the run stopped early (timeout, connection closed)


class Broken(Exception):
    pass


# ---------------------------------------------------------------- the client


class Conn:
    """One raw v3 connection, TCP or Unix socket; every read bounded by READ_TIMEOUT."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(READ_TIMEOUT)
        self.buf = b""
        self.pid = 0  # from BackendKeyData
        self.walker = _Walker(self)  # the server's state carries over from batch to batch

    @classmethod
    def open(
        cls, address: str | tuple[str, int], user: str, database: str, password: str = ""
    ) -> tuple[Conn, list[tuple[bytes, bytes]]]:
        """Connects and logs in; returns the connection and the login messages."""
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(READ_TIMEOUT)
            sock.connect(address)
        else:
            sock = socket.create_connection(address, timeout=READ_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = cls(sock)
        try:
            return conn, conn._login(user, database, password)
        except BaseException:
            conn.close()
            raise

    def _login(self, user: str, database: str, password: str) -> list[tuple[bytes, bytes]]:
        self.sock.sendall(codec.build_startup({"user": user, "database": database}))
        msgs: list[tuple[bytes, bytes]] = []
        scram: scramp.ScramClient | None = None
        while True:
            kind, body = self.read()
            if kind == b"R":
                code = _I32.unpack_from(body)[0]
                if code == 3:  # cleartext
                    self.sock.sendall(codec.build_password(codec.cstr(password)))
                elif code == 5:  # md5
                    inner = hashlib.md5((password + user).encode()).hexdigest().encode()
                    digest = hashlib.md5(inner + body[4:8]).hexdigest()
                    self.sock.sendall(codec.build_password(codec.cstr("md5" + digest)))
                elif code == 10:
                    scram = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
                    first = scram.get_client_first().encode()
                    self.sock.sendall(codec.build_sasl_initial("SCRAM-SHA-256", first))
                elif code == 11 and scram is not None:
                    scram.set_server_first(body[4:].decode())
                    self.sock.sendall(codec.build_password(scram.get_client_final().encode()))
                elif code == 12 and scram is not None:
                    scram.set_server_final(body[4:].decode())
                elif code != 0:
                    raise RuntimeError(f"unsupported authentication request {code}")
                continue
            msgs.append((kind, body))
            if kind == b"K":
                self.pid = _I32.unpack_from(body)[0]
            elif kind == b"E":
                raise RuntimeError(f"login refused: {codec.error_fields(kind + b'0000' + body)}")
            elif kind == b"Z":
                return msgs

    # ------------------------------------------------------------ bytes

    def read(self) -> tuple[bytes, bytes]:
        """One backend message as (kind, body); raises Broken on timeout or EOF."""
        while len(self.buf) < 5 or len(self.buf) < 1 + _I32.unpack_from(self.buf, 1)[0]:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise Broken("timeout") from None
            except OSError as exc:
                raise Broken(f"connection error: {exc}") from None
            if not chunk:
                raise Broken("closed")
            self.buf += chunk
        length = _I32.unpack_from(self.buf, 1)[0]
        kind, body = self.buf[:1], self.buf[5 : 1 + length]
        self.buf = self.buf[1 + length :]
        return kind, body

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise Broken(f"connection error: {exc}") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(codec.TERMINATE)
        self.sock.close()

    # ------------------------------------------------------------ a batch

    def exchange(self, batch: Batch) -> list[Answer]:
        """Sends the batch's messages at once; its answers, one per answered step."""
        if batch and not isinstance(batch[-1], _FLUSHING):
            raise ValueError(f"a batch must end with a Sync, a Query or a Flush: {batch!r}")
        walker = self.walker
        walker.answers = []
        self.send(b"".join(step.raw() for step in batch))
        for index, step in enumerate(batch):
            walker.step(index, step)
        return walker.answers

    def simple(self, sql: str) -> list[tuple[bytes, bytes]]:
        """A Query up to its ReadyForQuery (for the harness's own statements)."""
        self.send(codec.build_query(sql))
        out = []
        while True:
            kind, body = self.read()
            out.append((kind, body))
            if kind == b"Z":
                return out


class _Walker:
    """Reads the answers of one batch in order, as Postgres produces them."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.answers: list[Answer] = []
        self.skipping = False  # an extended-protocol message failed: nothing until Sync
        self.copy_in: str | None = None  # "simple" or "extended" while a COPY FROM runs

    def step(self, index: int, step: Step) -> None:
        if isinstance(step, (Steal, Give)):
            return
        if self.copy_in is not None:
            if isinstance(step, CopyData):
                return
            if isinstance(step, (CopyDone, CopyFail)):
                mode, self.copy_in = self.copy_in, None
                if mode == "simple":
                    self._read(index, b"Z")
                else:
                    self._read(index, b"CE")
                return
            if isinstance(step, (Flush, Sync)):
                return  # ignored during COPY FROM STDIN (copyfromparse.c), never answered
            raise AssertionError(f"the script sends {step!r} in the middle of a COPY")
        if isinstance(step, Sync):
            self.skipping = False
            self._read(index, b"Z")
            return
        if self.skipping or isinstance(step, (Flush, *_COPY_STEPS)):
            return  # ignored by the server, never answered
        if isinstance(step, Query):
            self._read(index, b"Z", copy_mode="simple")
        elif isinstance(step, Parse):
            self._read(index, b"1E")
        elif isinstance(step, Bind):
            self._read(index, b"2E")
        elif isinstance(step, Close):
            self._read(index, b"3E")
        elif isinstance(step, Describe):
            self._read(index, b"TnE" if step.target == "P" else b"E", then=b"Tn")
        elif isinstance(step, Execute):
            self._read(index, b"CsIE", copy_mode="extended")

    def _read(
        self, index: int, until: bytes, copy_mode: str | None = None, then: bytes = b""
    ) -> None:
        """Reads the answer of one step: messages up to one whose kind is in ``until``.
        ``then``: a ParameterDescription is followed by one of these (Describe S)."""
        answer = Answer(index)
        self.answers.append(answer)
        while True:
            kind, body = self.conn.read()
            answer.msgs.append((kind, body))
            if kind == b"E" and until != b"Z":
                self.skipping = True  # an extended-protocol message failed
                return
            if kind == b"t" and then:
                until = then
                continue
            if kind == b"G" and copy_mode is not None:
                self.copy_in = copy_mode
                return
            if kind in until:
                return


def run_script(conn: Conn, script: Script, harness: object | None = None) -> Transcript:
    """Runs ``script`` on a logged-in connection. ``harness`` has ``steal()`` and ``give()``."""
    transcript = Transcript()
    for batch in script:
        for step in batch:
            if harness is not None and isinstance(step, Steal):
                harness.steal()  # type: ignore[attr-defined]
            elif harness is not None and isinstance(step, Give):
                harness.give()  # type: ignore[attr-defined]
        try:
            transcript.batches.append(conn.exchange(batch))
        except Broken as exc:
            transcript.batches.append(conn.walker.answers)  # what came before it stopped
            transcript.broken = str(exc)
            break
    return transcript
