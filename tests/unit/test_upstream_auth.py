"""The proxy's own login to Postgres (guardproxy/pool/upstream_auth.py), against scripted
servers: honest ones (SCRAM from guardproxy's own server side, md5, trust) and hostile
ones (skipping SCRAM's final message, forging it, asking for the password in cleartext,
out-of-order and malformed messages). Against the real Postgres:
tests/integration/test_upstream_auth_live.py."""

from __future__ import annotations

import base64
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardproxy.pool.upstream_auth import MAX_SCRAM_ITERATIONS, Phase, UpstreamAuth
from guardproxy.protocol import codec
from guardproxy.protocol.errors import AuthFailed, UpstreamError
from guardproxy.protocol.scram import (
    MECHANISM,
    MECHANISM_PLUS,
    ServerExchange,
    Verifier,
    md5_password,
)

USER, PASSWORD = "guard", "s3cret-pw"
VERIFIER = Verifier.from_password(PASSWORD)
OK = codec.auth_request(0)
BINDING = b"\x01" * 32  # tls-server-end-point data of "the server's certificate"


def sasl(*mechanisms: str) -> bytes:
    return codec.auth_request(10, b"".join(codec.cstr(m) for m in mechanisms) + b"\x00")


def auth(**kw: object) -> UpstreamAuth:
    options: dict[str, object] = {"where": "db:5432", "tls": False, **kw}
    password = options.pop("password", PASSWORD)
    return UpstreamAuth(USER, password, **options)  # type: ignore[arg-type]


class ScramServer:
    """The server side of SCRAM as Postgres runs it (guardproxy's own ServerExchange)."""

    def __init__(self, verifier: Verifier = VERIFIER, binding: bytes = b"") -> None:
        self.verifier, self.binding = verifier, binding
        self.exchange: ServerExchange | None = None

    def first(self, initial: bytes) -> bytes:
        mechanism, data = codec.parse_sasl_initial(initial)
        self.exchange = ServerExchange(USER, self.verifier, mechanism, self.binding)
        return codec.auth_request(11, self.exchange.first(data))

    def final(self, response: bytes) -> bytes:
        assert self.exchange is not None
        return codec.auth_request(12, self.exchange.final(response[5:]))


def scram_until_final(client: UpstreamAuth, server: ScramServer, offer: bytes) -> bytes:
    """Runs SCRAM up to the client's proof; returns the server's honest SASLFinal."""
    initial = client.receive(offer)
    assert initial is not None and initial[:1] == b"p"
    proof = client.receive(server.first(initial))
    assert proof is not None and client.phase is Phase.SASL_PROVED
    return server.final(proof)


def refused(client: UpstreamAuth, raw: bytes, *words: str) -> UpstreamError:
    with pytest.raises(UpstreamError) as exc:
        client.receive(raw)
    message = exc.value.message
    assert PASSWORD not in message and all(w in message for w in words), message
    return exc.value


# ---------------------------------------------------------------- honest servers


def test_scram_login_verifies_the_server_and_completes() -> None:
    client, server = auth(), ScramServer()
    final = scram_until_final(client, server, sasl(MECHANISM))
    assert client.receive(final) is None and client.phase is Phase.SASL_VERIFIED
    with pytest.raises(UpstreamError, match="skipped authentication"):
        client.check_authenticated(ord("Z"))
    assert client.receive(OK) is None and client.authenticated and client.method == MECHANISM
    client.check_authenticated(ord("S"))  # ParameterStatus after AuthenticationOk: fine


def test_scram_plus_binds_the_channel_when_tls_and_offered() -> None:
    client, server = auth(tls=True, channel_binding=BINDING), ScramServer(binding=BINDING)
    final = scram_until_final(client, server, sasl(MECHANISM_PLUS, MECHANISM))
    assert client.method == MECHANISM_PLUS
    client.receive(final)
    assert client.receive(OK) is None and client.authenticated


def test_a_man_in_the_middle_with_another_certificate_fails_the_binding() -> None:
    """The real server sees another certificate's hash than the proxy did: it refuses."""
    client, server = auth(tls=True, channel_binding=BINDING), ScramServer(binding=b"\x02" * 32)
    initial = client.receive(sasl(MECHANISM_PLUS, MECHANISM))
    assert initial is not None
    proof = client.receive(server.first(initial))
    assert proof is not None
    with pytest.raises(AuthFailed):
        server.final(proof)


def test_stripping_plus_from_the_offer_is_seen_by_a_server_that_can_bind() -> None:
    client, server = auth(tls=True, channel_binding=BINDING), ScramServer(binding=BINDING)
    initial = client.receive(sasl(MECHANISM))  # a middle man removed -PLUS
    assert initial is not None and client.method == MECHANISM
    with pytest.raises(AuthFailed, match="downgrade"):
        server.first(initial)


def test_md5_and_trust_work_as_before() -> None:
    client = auth()
    answer = client.receive(codec.auth_request(5, b"salt"))
    assert answer == codec.build_password(md5_password(USER, PASSWORD, b"salt") + b"\x00")
    assert client.receive(OK) is None and client.authenticated and client.method == "md5"
    trusting = auth()
    assert trusting.receive(OK) is None and trusting.authenticated and trusting.method == "trust"


def test_cleartext_is_sent_only_when_allowed_and_over_tls() -> None:
    request = codec.auth_request(3)
    refused(auth(), request, "cleartext", "does not send it")
    refused(auth(allow_cleartext=True), request, "not TLS")
    client = auth(allow_cleartext=True, tls=True)
    assert client.receive(request) == codec.build_password(PASSWORD.encode() + b"\x00")
    assert client.receive(OK) is None and client.authenticated


def test_no_password_in_the_dsn_says_so() -> None:
    error = refused(auth(password=None), sasl(MECHANISM), "has none")
    assert error.sqlstate == "28P01"


# ---------------------------------------------------------------- hostile servers


def test_a_server_that_skips_the_scram_final_message_is_refused() -> None:
    client, server = auth(), ScramServer()
    scram_until_final(client, server, sasl(MECHANISM))
    refused(client, OK, "before proving", "impostor")
    assert not client.authenticated


def test_ok_right_after_the_scram_start_is_refused() -> None:
    client = auth()
    client.receive(sasl(MECHANISM))
    refused(client, OK, "before proving")


def test_a_forged_server_signature_is_refused() -> None:
    """An impostor that does not know the password cannot compute the signature."""
    client, server = auth(), ScramServer()
    scram_until_final(client, server, sasl(MECHANISM))
    forged = codec.auth_request(12, b"v=" + base64.b64encode(b"\x00" * 32))
    refused(client, forged, "failed to prove", "impostor")
    refused(client, OK, "before proving")  # and cannot go on to AuthenticationOk


def test_an_impostor_with_another_verifier_is_refused() -> None:
    """A server holding another password's keys: its signature cannot match."""
    client = auth()
    initial = client.receive(sasl(MECHANISM))
    assert initial is not None
    _, data = codec.parse_sasl_initial(initial)
    bare = data.decode().split(",", 2)[2]
    nonce = dict(p.split("=", 1) for p in bare.split(","))["r"] + "servernonce"
    other = Verifier.from_password("another-password")
    salt = base64.b64encode(other.salt).decode()
    proof = client.receive(codec.auth_request(11, f"r={nonce},s={salt},i=4096".encode()))
    assert proof is not None
    refused(client, codec.auth_request(12, b"v=" + base64.b64encode(other.server_key)), "failed")


def test_a_server_error_in_the_final_message_is_refused() -> None:
    client, server = auth(), ScramServer()
    scram_until_final(client, server, sasl(MECHANISM))
    refused(client, codec.auth_request(12, b"e=invalid-proof"), "failed to prove")


@pytest.mark.parametrize(
    ("server_first", "words"),
    [
        (b"r=notournonce,s=c2FsdA==,i=4096", ("invalid SCRAM server-first",)),
        (f"r=NONCE,s=c2FsdA==,i={MAX_SCRAM_ITERATIONS + 1}".encode(), ("iterations",)),
        (b"r=NONCE,s=c2FsdA==,i=0", ("iterations",)),
        (b"r=NONCE,s=c2FsdA==", ("no SCRAM iterations",)),
        (b"r=NONCE,s=c2FsdA==,i=4096\xff", ("not UTF-8",)),
    ],
)
def test_bad_server_first_messages_are_refused(server_first: bytes, words: tuple[str, ...]) -> None:
    client = auth()
    initial = client.receive(sasl(MECHANISM))
    assert initial is not None
    nonce = dict(p.split("=", 1) for p in initial.split(b",", 2)[2].decode().split(","))["r"]
    refused(client, codec.auth_request(11, server_first.replace(b"NONCE", nonce.encode())), *words)


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        (codec.auth_request(7), ("GSSAPI",)),
        (codec.auth_request(9), ("SSPI",)),
        (codec.auth_request(99), ("unknown authentication",)),
        (sasl("SCRAM-SHA-1"), ("none of which",)),
        (sasl(MECHANISM_PLUS), ("none of which",)),  # no binding data: -PLUS only is no use
        (codec.auth_request(11, b"r=x"), ("request 11",)),
        (codec.auth_request(12, b"v=x"), ("request 12",)),
        (codec.auth_request(5, b"sa"), ("salt",)),
        (b"R\x00\x00\x00\x05", ("malformed",)),
        (b"S\x00\x00\x00\x04", ("not 'R'",)),
    ],
)
def test_unsupported_out_of_order_and_malformed_requests_are_refused(
    request_: bytes, words: tuple[str, ...]
) -> None:
    refused(auth(), request_, *words)


def test_requests_after_authentication_are_refused() -> None:
    client = auth()
    client.receive(OK)
    refused(client, OK, "while authenticated")
    refused(client, codec.auth_request(3), "while authenticated")


def test_a_server_that_skips_authentication_altogether_is_refused() -> None:
    client = auth()
    with pytest.raises(UpstreamError, match="skipped authentication"):
        client.check_authenticated(ord("Z"))  # ReadyForQuery with no AuthenticationOk


@given(st.integers(min_value=0, max_value=3), st.binary(max_size=64), st.integers(-5, 20))
def test_garbage_in_any_phase_ends_in_upstream_error_or_a_reply(
    steps: int, payload: bytes, code: int
) -> None:
    """Whatever a server sends, the machine answers or raises UpstreamError; nothing else."""
    client, server = auth(tls=True, channel_binding=BINDING), ScramServer(binding=BINDING)
    try:
        out = client.receive(sasl(MECHANISM_PLUS, MECHANISM)) if steps else None
        if steps > 1 and out is not None:
            out = client.receive(server.first(out))
        if steps > 2 and out is not None:
            client.receive(server.final(out))
    except UpstreamError:
        return
    raw = b"R" + struct.pack("!ii", 8 + len(payload), code) + payload
    try:
        client.receive(raw)
    except UpstreamError:
        pass
