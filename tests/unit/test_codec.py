"""The sans-IO codec on its own: framing, startup packets, the fields the proxy rewrites."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardproxy.protocol import codec
from guardproxy.protocol.errors import ProtocolViolation

PROPERTY = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def drain(reader: codec.MessageReader) -> list[tuple[int, bytes]]:
    out = []
    while (msg := reader.next()) is not None:
        out.append(msg)
    return out


def bind_message(portal: bytes, statement: bytes, params: list[bytes | None]) -> bytes:
    body = portal + b"\x00" + statement + b"\x00"
    body += struct.pack("!hh", 1, 0)  # one format code: text
    body += struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    body += struct.pack("!hh", 1, 1)  # one result format: binary
    return codec.message(b"B", body)


# ---------------------------------------------------------------- MessageReader


def test_reader_returns_whole_messages_in_order_across_byte_by_byte_feeding() -> None:
    stream = codec.build_query("select 1") + codec.SYNC + codec.message(b"d", b"a,b\n")
    reader = codec.MessageReader(1024)
    got = []
    for i in range(len(stream)):
        reader.feed(stream[i : i + 1])
        got += drain(reader)
    assert got == [
        (ord("Q"), codec.build_query("select 1")),
        (ord("S"), codec.SYNC),
        (ord("d"), codec.message(b"d", b"a,b\n")),
    ]
    assert reader.pending() == 0


def test_reader_waits_for_an_incomplete_message_and_keeps_what_follows() -> None:
    first, second = codec.build_query("select 'a'"), codec.build_query("select 'b'")
    reader = codec.MessageReader(1024)
    reader.feed(first + second[:3])
    assert reader.next() == (ord("Q"), first)
    assert reader.next() is None
    assert reader.pending() == 3
    reader.feed(second[3:])
    assert reader.next() == (ord("Q"), second)
    assert reader.take_rest() == b""


def test_reader_accepts_empty_payload_and_exactly_max_size() -> None:
    reader = codec.MessageReader(64)
    biggest = codec.message(b"d", b"x" * 60)  # declared length 64
    reader.feed(codec.message(b"H") + biggest)
    assert drain(reader) == [(ord("H"), codec.message(b"H")), (ord("d"), biggest)]


def test_reader_reassembles_a_large_message_fed_in_many_small_reads() -> None:
    big = codec.message(b"d", bytes(range(256)) * 4096)  # 1 MiB of COPY data
    after = codec.build_query("select 2")
    stream = codec.SYNC + big + after
    reader = codec.MessageReader(4 << 20)
    got: list[tuple[int, bytes]] = []
    for start in range(0, len(stream), 4096):
        reader.feed(stream[start : start + 4096])
        got += drain(reader)
        if len(got) == 1:  # inside the big message: counted, not yet returned
            assert reader.pending() == min(start + 4096, len(stream)) - len(codec.SYNC)
    assert got == [(ord("S"), codec.SYNC), (ord("d"), big), (ord("Q"), after)]
    assert reader.pending() == 0


def test_reader_hands_over_a_partly_collected_large_message_intact() -> None:
    big = codec.message(b"d", b"y" * 200_000)
    reader = codec.MessageReader(1 << 20)
    reader.feed(big[:70_000])
    assert reader.next() is None
    reader.feed(big[70_000:150_000])
    assert reader.pending() == 150_000
    assert reader.take_rest() == big[:150_000]
    assert reader.pending() == 0


@pytest.mark.parametrize("length", [-1, 0, 3, 65, 2**31 - 1])
def test_reader_rejects_lengths_outside_4_to_max_size(length: int) -> None:
    reader = codec.MessageReader(64)
    reader.feed(b"Q" + struct.pack("!i", length))  # the header alone: no body is buffered
    with pytest.raises(ProtocolViolation) as info:
        reader.next()
    assert str(length) in info.value.message
    assert "64" in info.value.message
    assert info.value.sqlstate == "08P01"


def test_reader_rejects_a_hostile_length_before_its_body_arrives() -> None:
    reader = codec.MessageReader(1024)
    reader.feed(codec.build_query("select 1") + b"d" + struct.pack("!i", 1 << 30) + b"abc")
    assert reader.next() == (ord("Q"), codec.build_query("select 1"))
    with pytest.raises(ProtocolViolation, match="max_message_size"):
        reader.next()


frontend_message = st.builds(
    lambda kind, payload: codec.message(bytes([kind]), payload),
    st.sampled_from(sorted(codec.FRONTEND_TYPES)),
    st.binary(max_size=80),
)
garbage_or_messages = st.lists(st.one_of(frontend_message, st.binary(max_size=40)), max_size=12)


@PROPERTY
@given(
    segments=garbage_or_messages,
    cuts=st.lists(st.integers(0, 2000), max_size=30),
    max_size=st.integers(4, 120),
)
def test_reader_property_only_protocol_violation_and_bounded_buffering(
    segments: list[bytes], cuts: list[int], max_size: int
) -> None:
    data = b"".join(segments)
    reader = codec.MessageReader(max_size)
    framed = b""
    for chunk in chunked(data, cuts):
        reader.feed(chunk)
        try:
            got = drain(reader)
        except ProtocolViolation:
            # The session closes the client here; what was framed so far is a prefix.
            assert data.startswith(framed)
            return
        for kind, raw in got:
            (declared,) = struct.unpack_from("!i", raw, 1)
            assert kind == raw[0]
            assert 4 <= declared <= max_size
            assert len(raw) == 1 + declared
            framed += raw
        # An incomplete message is never more than one message of the largest allowed size.
        assert reader.pending() <= max_size
    assert framed + reader.take_rest() == data


@PROPERTY
@given(
    messages=st.lists(frontend_message, max_size=15),
    cuts=st.lists(st.integers(0, 1500), max_size=40),
)
def test_reader_property_any_chunking_yields_exactly_the_messages_sent(
    messages: list[bytes], cuts: list[int]
) -> None:
    reader = codec.MessageReader(1024)
    got = []
    for chunk in chunked(b"".join(messages), cuts):
        reader.feed(chunk)
        got += [raw for _, raw in drain(reader)]
    assert got == messages
    assert reader.pending() == 0


# ---------------------------------------------------------------- startup phase


def test_parse_startup_v3_parameters() -> None:
    packet = codec.build_startup({"user": "agent-1", "database": "app", "application_name": "x y"})
    consumed, body = codec.read_startup(packet + b"extra", 10000)
    assert consumed == len(packet)
    startup = codec.parse_startup(body)
    assert startup.code == codec.PROTOCOL_V3
    assert startup.params == {"user": "agent-1", "database": "app", "application_name": "x y"}


def test_read_startup_waits_for_the_whole_packet() -> None:
    packet = codec.build_startup({"user": "a"})
    assert codec.read_startup(packet[:3], 10000) is None
    assert codec.read_startup(packet[:-1], 10000) is None
    assert codec.read_startup(packet, 10000) == (len(packet), packet[4:])


@pytest.mark.parametrize("code", [codec.SSL_REQUEST, codec.GSSENC_REQUEST])
def test_parse_startup_encryption_requests(code: int) -> None:
    _, body = codec.read_startup(struct.pack("!ii", 8, code), 10000)
    assert codec.parse_startup(body) == codec.Startup(code, {})


def test_parse_startup_cancel_request_round_trips_build_cancel() -> None:
    _, body = codec.read_startup(codec.build_cancel(4242, -7), 10000)
    startup = codec.parse_startup(body)
    assert (startup.code, startup.cancel_pid, startup.cancel_secret) == (
        codec.CANCEL_REQUEST,
        4242,
        -7,
    )


def test_parse_startup_other_protocol_versions_are_left_to_the_caller() -> None:
    startup = codec.parse_startup(struct.pack("!i", 2 << 16) + b"\x00" * 292)
    assert (startup.code >> 16, startup.code & 0xFFFF, startup.params) == (2, 0, {})


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (struct.pack("!i", codec.CANCEL_REQUEST) + b"\x00" * 4, "CancelRequest"),
        (struct.pack("!i", codec.CANCEL_REQUEST) + b"\x00" * 12, "CancelRequest"),
        (struct.pack("!i", codec.PROTOCOL_V3) + b"user\x00a\x00", "NUL-terminated"),
        (struct.pack("!i", codec.PROTOCOL_V3) + b"user\x00a", "NUL-terminated"),
        (struct.pack("!i", codec.PROTOCOL_V3) + b"user\x00\x00", "without a value"),
        (struct.pack("!i", codec.PROTOCOL_V3) + b"user\x00\xff\xfe\x00\x00", "UTF-8"),
    ],
)
def test_parse_startup_malformed(body: bytes, why: str) -> None:
    with pytest.raises(ProtocolViolation, match=why):
        codec.parse_startup(body)


@pytest.mark.parametrize("length", [0, 7, 10001, 2**31 - 1, -8])
def test_read_startup_rejects_bad_lengths(length: int) -> None:
    with pytest.raises(ProtocolViolation, match=str(length)):
        codec.read_startup(struct.pack("!i", length) + b"\x00" * 8, 1 << 20)


def test_read_startup_error_names_the_limit_that_applied() -> None:
    # With max_message_size 1024 a 2000-byte startup packet is refused; the error
    # must state the limit that refused it, not a different one.
    with pytest.raises(ProtocolViolation) as info:
        codec.read_startup(struct.pack("!i", 2000) + b"\x00" * 8, 1024)
    assert "1024" in info.value.message, info.value.message


@PROPERTY
@given(data=st.binary(max_size=300), max_size=st.integers(1024, 20000))
def test_startup_property_any_bytes_only_protocol_violation(data: bytes, max_size: int) -> None:
    try:
        packet = codec.read_startup(data, max_size)
        if packet is not None:
            codec.parse_startup(packet[1])
    except ProtocolViolation:
        pass


@PROPERTY
@given(
    code=st.sampled_from([codec.PROTOCOL_V3, codec.CANCEL_REQUEST, codec.SSL_REQUEST]),
    tail=st.binary(max_size=100),
)
def test_startup_property_near_valid_bodies_only_protocol_violation(code: int, tail: bytes) -> None:
    try:
        codec.parse_startup(struct.pack("!i", code) + tail)
    except ProtocolViolation:
        pass


# ---------------------------------------------------------------- messages the proxy reads


def test_parse_parse_round_trips_build_parse() -> None:
    tail = struct.pack("!hii", 2, 23, 25)
    raw = codec.build_parse(b"s1", b"select $1::int, $2::text", tail)
    parsed = codec.parse_parse(raw)
    assert parsed == codec.ParseMessage(b"s1", b"select $1::int, $2::text", tail)
    assert codec.build_parse(parsed.name, parsed.query, parsed.tail) == raw


def test_parse_parse_unnamed_without_types() -> None:
    parsed = codec.parse_parse(codec.build_parse(b"", b"select 1", struct.pack("!h", 0)))
    assert (parsed.name, parsed.query, parsed.tail) == (b"", b"select 1", b"\x00\x00")


@pytest.mark.parametrize(
    "body",
    [
        b"s1\x00select 1\x00" + struct.pack("!h", 2) + struct.pack("!i", 23),  # one OID short
        b"s1\x00select 1\x00" + struct.pack("!hi", 0, 23),  # one OID too many
        b"s1\x00select 1\x00",  # no count at all
        b"s1\x00select 1",  # query not terminated
        b"s1",  # name not terminated
    ],
)
def test_parse_parse_malformed(body: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        codec.parse_parse(codec.message(b"P", body))


def test_bind_statement_and_replace_field_round_trip() -> None:
    raw = bind_message(b"portal", b"client_stmt", [b"42", None, b"hello"])
    name, start, end = codec.bind_statement(raw)
    assert name == b"client_stmt"
    assert raw[start:end] == b"client_stmt"
    new = codec.replace_field(raw, start, end, b"gp_0123456789abcdef")
    assert new == bind_message(b"portal", b"gp_0123456789abcdef", [b"42", None, b"hello"])
    (declared,) = struct.unpack_from("!i", new, 1)
    assert declared == len(new) - 1
    assert codec.bind_statement(new)[0] == b"gp_0123456789abcdef"
    # and back again to exactly the original bytes
    _, s2, e2 = codec.bind_statement(new)
    assert codec.replace_field(new, s2, e2, name) == raw


name_bytes = st.binary(max_size=40).map(lambda b: b.replace(b"\x00", b"n"))


@PROPERTY
@given(
    portal=name_bytes,
    statement=name_bytes,
    new_name=name_bytes,
    params=st.lists(st.one_of(st.none(), st.binary(max_size=30)), max_size=5),
)
def test_bind_replace_property(
    portal: bytes, statement: bytes, new_name: bytes, params: list[bytes | None]
) -> None:
    raw = bind_message(portal, statement, params)
    name, start, end = codec.bind_statement(raw)
    assert name == statement
    new = codec.replace_field(raw, start, end, new_name)
    assert new == bind_message(portal, new_name, params)
    reader = codec.MessageReader(1 << 16)
    reader.feed(new)
    assert reader.next() == (ord("B"), new)


def test_bind_statement_malformed() -> None:
    with pytest.raises(ProtocolViolation):
        codec.bind_statement(codec.message(b"B", b"portal\x00stmt-without-nul"))


def test_describe_or_close_target() -> None:
    assert codec.describe_or_close_target(codec.message(b"D", b"Sname\x00")) == (b"S", b"name")
    assert codec.describe_or_close_target(codec.message(b"C", b"P\x00")) == (b"P", b"")
    with pytest.raises(ProtocolViolation, match="'S' or 'P'"):
        codec.describe_or_close_target(codec.message(b"D", b"Xname\x00"))
    with pytest.raises(ProtocolViolation):
        codec.describe_or_close_target(codec.message(b"D", b"S"))


def test_parse_query_needs_its_terminator() -> None:
    assert codec.parse_query(codec.build_query("select 'é'")) == "select 'é'".encode()
    with pytest.raises(ProtocolViolation):
        codec.parse_query(codec.message(b"Q", b"select 1"))


def test_error_fields_round_trip_build_error() -> None:
    raw = codec.build_error(
        "53300", "no server", severity="FATAL", detail="all busy", hint="retry later"
    )
    assert raw[:1] == b"E"
    assert codec.error_fields(raw) == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "53300",
        "M": "no server",
        "D": "all busy",
        "H": "retry later",
    }
    notice = codec.build_notice("01000", "careful", hint="h")
    assert notice[:1] == b"N"
    assert codec.error_fields(notice)["M"] == "careful"


def test_error_fields_of_a_real_postgres_error_and_malformed_ones() -> None:
    body = b'SERROR\x00VERROR\x00C42P01\x00Mrelation "nope" does not exist\x00P15\x00\x00'
    fields = codec.error_fields(codec.message(b"E", body))
    assert fields == {
        "S": "ERROR",
        "V": "ERROR",
        "C": "42P01",
        "M": 'relation "nope" does not exist',
        "P": "15",
    }
    assert codec.error_fields(codec.message(b"E", b"\x00")) == {}
    with pytest.raises(ProtocolViolation):
        codec.error_fields(codec.message(b"E", b"Mno terminator"))


def test_negotiate_version_and_small_builders() -> None:
    raw = codec.build_negotiate_version(3 << 16, ["_pq_.a", "_pq_.b"])
    assert raw[:1] == b"v"
    newest, count = struct.unpack_from("!ii", raw, 5)
    assert (newest, count) == (3 << 16, 2)
    assert raw[13:] == b"_pq_.a\x00_pq_.b\x00"
    assert codec.ready_for_query(b"T") == b"Z\x00\x00\x00\x05T"
    assert codec.parameter_status(codec.build_parameter_status("TimeZone", "UTC")) == (
        "TimeZone",
        "UTC",
    )
    assert codec.command_tag(codec.build_command_complete("INSERT 0 1")) == b"INSERT 0 1"
    assert codec.auth_code(codec.auth_request(10, b"SCRAM-SHA-256\x00\x00")) == 10
    with pytest.raises(ProtocolViolation):
        codec.auth_code(codec.message(b"R", b"\x00"))


def test_sasl_initial_round_trip_and_truncation() -> None:
    raw = codec.build_sasl_initial("SCRAM-SHA-256", b"n,,n=,r=abc")
    assert codec.parse_sasl_initial(raw) == ("SCRAM-SHA-256", b"n,,n=,r=abc")
    with pytest.raises(ProtocolViolation, match="length"):
        codec.parse_sasl_initial(raw[:-2])
    with pytest.raises(ProtocolViolation, match="truncated"):
        codec.parse_sasl_initial(codec.message(b"p", b"SCRAM-SHA-256\x00\x00"))
