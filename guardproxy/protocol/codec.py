"""Sans-IO codec for the PostgreSQL v3 wire protocol.

Bytes in, messages out; message builders for what the proxy itself says.
Nothing here touches a socket. Messages the proxy forwards unchanged stay raw
``bytes`` (type byte + length + payload) so they are never re-encoded.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from guardproxy.protocol.errors import ProtocolViolation

PROTOCOL_V3 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
# A cancel request one guardproxy instance forwards to another (1234.5690, a code no
# Postgres client sends): the same 16 bytes as a CancelRequest, but the receiver handles
# it itself or relays it to its own worker, never to another instance, so a stale
# instance registry can never make a cancel request go round in circles.
RELAYED_CANCEL_REQUEST = (1234 << 16) | 5690
CANCEL_CODES = frozenset((CANCEL_REQUEST, RELAYED_CANCEL_REQUEST))

_I32 = struct.Struct("!i")
_HDR = struct.Struct("!ci")
_U16 = struct.Struct("!H")

# Client message types the proxy understands (frontend).
FRONTEND_TYPES = frozenset(b"QPBDECHSdcfXp")


def _header(kind: bytes, payload_len: int) -> bytes:
    return _HDR.pack(kind, payload_len + 4)


def split_messages(data: bytes) -> list[tuple[int, bytes]]:
    """(type, whole message) of each message in ``data``: whole messages the proxy holds
    already (a job's answer), never bytes straight from a socket."""
    out: list[tuple[int, bytes]] = []
    pos, size = 0, len(data)
    while pos + 5 <= size:
        (length,) = _I32.unpack_from(data, pos + 1)
        end = pos + 1 + max(length, 4)
        out.append((data[pos], data[pos:end]))
        pos = end
    return out


def message(kind: bytes, payload: bytes = b"") -> bytes:
    return _header(kind, len(payload)) + payload


def cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


# ---------------------------------------------------------------- framing


class MessageReader:
    """Splits a byte stream into typed messages.

    ``feed`` appends bytes; ``next`` returns ``(type, raw)`` where ``raw`` is the
    whole message including its header, or ``None`` when a message is
    incomplete. Lengths outside ``4..max_size`` raise ProtocolViolation before any
    buffering of the body, so a hostile length cannot make us allocate.

    A large message arriving in many reads is collected as a list of chunks and
    joined once, when complete: appending to one bytes object per read would copy
    it again on every read.
    """

    __slots__ = ("_buf", "_need", "_parts", "_parts_len", "_pos", "max_size")

    def __init__(self, max_size: int) -> None:
        self._buf = b""
        self._pos = 0
        self.max_size = max_size
        self._parts: list[bytes] | None = None  # chunks of a large incomplete message
        self._parts_len = 0
        self._need = 0

    def feed(self, data: bytes) -> None:
        parts = self._parts
        if parts is not None:
            parts.append(data)
            self._parts_len += len(data)
            if self._parts_len >= self._need:
                self._buf, self._pos, self._parts = b"".join(parts), 0, None
            return
        if self._pos:
            self._buf = self._buf[self._pos :] + data
            self._pos = 0
        elif self._buf:
            self._buf += data
        else:
            self._buf = data

    def next(self) -> tuple[int, bytes] | None:
        if self._parts is not None:
            return None
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 5:
            return None
        kind = buf[pos]
        (length,) = _I32.unpack_from(buf, pos + 1)
        if length < 4 or length > self.max_size:
            raise ProtocolViolation(
                f"message of type {chr(kind)!r} declares length {length}, "
                f"outside 4..{self.max_size} (max_message_size)"
            )
        end = pos + 1 + length
        if len(buf) < end:
            if length > _COLLECT_ABOVE:
                rest = buf[pos:]
                self._parts, self._parts_len, self._need = [rest], len(rest), end - pos
                self._buf, self._pos = b"", 0
            return None
        self._pos = end
        return kind, buf[pos:end]

    def pending(self) -> int:
        if self._parts is not None:
            return self._parts_len
        return len(self._buf) - self._pos

    def take_rest(self) -> bytes:
        if self._parts is not None:
            rest = b"".join(self._parts)
            self._parts = None
        else:
            rest = self._buf[self._pos :]
        self._buf, self._pos = b"", 0
        return rest


_COLLECT_ABOVE = 1 << 16  # messages larger than this are collected in chunks


def read_startup(buf: bytes, max_size: int) -> tuple[int, bytes] | None:
    """Returns ``(consumed, body)`` of an untyped startup-phase packet, or None."""
    if len(buf) < 4:
        return None
    (length,) = _I32.unpack_from(buf, 0)
    limit = min(max_size, 10000)
    if length < 8 or length > limit:
        raise ProtocolViolation(f"startup packet declares length {length}, outside 8..{limit}")
    if len(buf) < length:
        return None
    return length, buf[4:length]


@dataclass(frozen=True)
class Startup:
    code: int
    params: dict[str, str]
    cancel_pid: int = 0
    cancel_secret: int = 0


def parse_startup(body: bytes) -> Startup:
    (code,) = _I32.unpack_from(body, 0)
    if code in CANCEL_CODES:
        if len(body) != 12:
            kind = "CancelRequest" if code == CANCEL_REQUEST else "relayed CancelRequest"
            raise ProtocolViolation(f"{kind} must be 16 bytes long")
        pid, secret = struct.unpack_from("!ii", body, 4)
        return Startup(code, {}, pid, secret)
    if code in (SSL_REQUEST, GSSENC_REQUEST):
        return Startup(code, {})
    if code >> 16 != 3:
        return Startup(code, {})
    parts = body[4:].split(b"\x00")
    # A well-formed list ends with an empty name and then the final NUL.
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"":
        raise ProtocolViolation("startup parameters are not a NUL-terminated list")
    items = parts[:-2]
    if len(items) % 2:
        raise ProtocolViolation("startup parameter without a value")
    try:
        params = {items[i].decode(): items[i + 1].decode() for i in range(0, len(items), 2)}
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("startup parameters are not valid UTF-8") from exc
    return Startup(code, params)


# ---------------------------------------------------------------- decoding


def _cstring_at(buf: bytes, pos: int) -> tuple[bytes, int]:
    end = buf.find(b"\x00", pos)
    if end < 0:
        raise ProtocolViolation("string field is not NUL-terminated")
    return buf[pos:end], end + 1


def parse_query(raw: bytes) -> bytes:
    """SQL text of a Query ('Q') message, without its terminating NUL."""
    text, _ = _cstring_at(raw, 5)
    return text


@dataclass(frozen=True, slots=True)
class ParseMessage:
    name: bytes
    query: bytes
    tail: bytes  # parameter type count + OIDs, kept raw


def parse_parse(raw: bytes) -> ParseMessage:
    name, pos = _cstring_at(raw, 5)
    query, pos = _cstring_at(raw, pos)
    tail = raw[pos:]
    if len(tail) < 2 or len(tail) != 2 + 4 * _U16.unpack_from(tail, 0)[0]:
        raise ProtocolViolation("Parse message has a malformed parameter type list")
    return ParseMessage(name, query, tail)


def parameter_types(tail: bytes) -> tuple[int, ...]:
    """The parameter type OIDs a Parse message declares (0: let the server infer)."""
    count = _U16.unpack_from(tail, 0)[0]
    return struct.unpack_from(f"!{count}I", tail, 2)


def build_parse(name: bytes, query: bytes, tail: bytes) -> bytes:
    return message(b"P", name + b"\x00" + query + b"\x00" + tail)


def bind_statement(raw: bytes) -> tuple[bytes, int, int]:
    """For a Bind: (statement name, start, end) of the statement name in ``raw``."""
    _, pos = _cstring_at(raw, 5)
    name, end = _cstring_at(raw, pos)
    return name, pos, end - 1


def bind_portal(raw: bytes) -> bytes:
    """The portal name of a Bind."""
    name, _ = _cstring_at(raw, 5)
    return name


def execute_target(raw: bytes) -> tuple[bytes, int]:
    """For an Execute: (portal name, row limit; 0 for none)."""
    name, pos = _cstring_at(raw, 5)
    if len(raw) != pos + 4:
        raise ProtocolViolation("Execute message has a malformed row limit")
    return name, _I32.unpack_from(raw, pos)[0]


def bind_values(raw: bytes) -> bytes:
    """The parameter values of a Bind, length-prefixed, without format codes or names:
    what makes two executions of one statement the same request."""
    _, _, end = bind_statement(raw)
    pos = end + 1
    (formats,) = _U16.unpack_from(raw, pos)
    pos += 2 + 2 * formats
    (count,) = _U16.unpack_from(raw, pos)
    pos += 2
    start = pos
    for _ in range(count):
        (length,) = _I32.unpack_from(raw, pos)
        pos += 4 + max(length, 0)
    return raw[start:pos]


def replace_field(raw: bytes, start: int, end: int, value: bytes) -> bytes:
    """Returns ``raw`` with bytes [start:end) replaced and the length fixed."""
    body = raw[5:start] + value + raw[end:]
    return _header(raw[0:1], len(body)) + body


def describe_or_close_target(raw: bytes) -> tuple[bytes, bytes]:
    """For Describe / Close: (b'S' or b'P', name)."""
    if len(raw) < 7:
        raise ProtocolViolation("Describe/Close message too short")
    kind = raw[5:6]
    if kind not in (b"S", b"P"):
        raise ProtocolViolation(f"Describe/Close target must be 'S' or 'P', got {kind!r}")
    name, _ = _cstring_at(raw, 6)
    return kind, name


def error_fields(raw: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse / NoticeResponse, keyed by their one-letter code."""
    fields: dict[str, str] = {}
    pos = 5
    while pos < len(raw) and raw[pos] != 0:
        code = chr(raw[pos])
        value, pos = _cstring_at(raw, pos + 1)
        fields[code] = value.decode(errors="replace")
    return fields


def parameter_status(raw: bytes) -> tuple[str, str]:
    name, pos = _cstring_at(raw, 5)
    value, _ = _cstring_at(raw, pos)
    return name.decode(errors="replace"), value.decode(errors="replace")


def command_tag(raw: bytes) -> bytes:
    return raw[5:-1]


# ---------------------------------------------------------------- building


def build_startup(params: dict[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_V3) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\x00"
    return _I32.pack(len(body) + 4) + body


def build_cancel(pid: int, secret: int, code: int = CANCEL_REQUEST) -> bytes:
    return struct.pack("!iiii", 16, code, pid, secret)


def build_error(
    sqlstate: str,
    text: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
    kind: bytes = b"E",
) -> bytes:
    parts = [b"S" + cstr(severity), b"V" + cstr(severity), b"C" + cstr(sqlstate), b"M" + cstr(text)]
    if detail:
        parts.append(b"D" + cstr(detail))
    if hint:
        parts.append(b"H" + cstr(hint))
    return message(kind, b"".join(parts) + b"\x00")


def build_error_fields(fields: dict[str, str], kind: bytes = b"E") -> bytes:
    """An ErrorResponse (or NoticeResponse) with exactly these fields, in this order."""
    body = b"".join(code.encode() + cstr(value) for code, value in fields.items())
    return message(kind, body + b"\x00")


def build_notice(
    sqlstate: str, text: str, *, severity: str = "NOTICE", hint: str | None = None
) -> bytes:
    return build_error(sqlstate, text, severity=severity, hint=hint, kind=b"N")


def build_query(sql: str | bytes) -> bytes:
    data = sql.encode() if isinstance(sql, str) else sql
    return message(b"Q", data + b"\x00")


def build_close_statement(name: bytes) -> bytes:
    return message(b"C", b"S" + name + b"\x00")


def ready_for_query(status: bytes) -> bytes:
    return message(b"Z", status)


def auth_request(code: int, data: bytes = b"") -> bytes:
    return message(b"R", _I32.pack(code) + data)


AUTH_OK = auth_request(0)
PARSE_COMPLETE = message(b"1")
BIND_COMPLETE = message(b"2")
CLOSE_COMPLETE = message(b"3")
NO_DATA = message(b"n")
SYNC = message(b"S")
FLUSH = message(b"H")
TERMINATE = message(b"X")
NO_SSL = b"N"
SSL_REQUEST_PACKET = struct.pack("!ii", 8, SSL_REQUEST)


def build_parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def build_backend_key(pid: int, secret: int) -> bytes:
    return message(b"K", struct.pack("!ii", pid, secret))


def build_command_complete(tag: str) -> bytes:
    return message(b"C", cstr(tag))


def build_negotiate_version(newest_minor: int, unsupported: list[str]) -> bytes:
    body = (
        _I32.pack(newest_minor)
        + _I32.pack(len(unsupported))
        + b"".join(cstr(o) for o in unsupported)
    )
    return message(b"v", body)


def build_password(data: bytes) -> bytes:
    return message(b"p", data)


def build_sasl_initial(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstr(mechanism) + _I32.pack(len(data)) + data)


def parse_sasl_initial(raw: bytes) -> tuple[str, bytes]:
    mech, pos = _cstring_at(raw, 5)
    if len(raw) < pos + 4:
        raise ProtocolViolation("SASLInitialResponse is truncated")
    (length,) = _I32.unpack_from(raw, pos)
    data = raw[pos + 4 :]
    if length != len(data):
        raise ProtocolViolation("SASLInitialResponse length does not match its data")
    return mech.decode(errors="replace"), data


def auth_code(raw: bytes) -> int:
    if len(raw) < 9:
        raise ProtocolViolation("Authentication message too short")
    return int(_I32.unpack_from(raw, 5)[0])


def build_row_description(names: list[str]) -> bytes:
    """A RowDescription of text columns (type ``text``, OID 25)."""
    fields = b"".join(cstr(n) + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0) for n in names)
    return message(b"T", struct.pack("!h", len(names)) + fields)


def build_data_row(values: Sequence[str | None]) -> bytes:
    parts = [struct.pack("!h", len(values))]
    for value in values:
        if value is None:
            parts.append(_I32.pack(-1))
        else:
            data = value.encode()
            parts.append(_I32.pack(len(data)) + data)
    return message(b"D", b"".join(parts))
