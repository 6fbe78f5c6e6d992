"""SCRAM-SHA-256 verifiers and the server side of the exchange, against scramp's client."""

from __future__ import annotations

import base64
import hashlib
import hmac
import stat
from pathlib import Path

import pytest
import scramp

from guardproxy.protocol.errors import AuthFailed, ConfigError
from guardproxy.protocol.scram import (
    MECHANISM,
    ClientExchange,
    ServerExchange,
    Verifier,
    load_verifiers,
    write_verifier,
)

NONCE = "fixedclientnonce0123456789"


def exchange(
    agent: str, verifier: Verifier | None, password: str, nonce: str | None = None
) -> tuple[scramp.ScramClient, ServerExchange, str]:
    """Runs the first round; returns the client, the server and the server-first message."""
    client = scramp.ScramClient([MECHANISM], agent, password, c_nonce=nonce)
    server = ServerExchange(agent, verifier)
    server_first = server.first(client.get_client_first().encode()).decode()
    client.set_server_first(server_first)
    return client, server, server_first


def parse_server_first(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(","))


# ---------------------------------------------------------------- verifiers


def test_verifier_encode_decode_round_trip() -> None:
    v = Verifier.from_password("s3cret", iterations=4096)
    text = v.encode()
    assert text.startswith("SCRAM-SHA-256$4096:")
    assert Verifier.decode(text) == v


def test_verifier_matches_the_rfc_5802_derivation() -> None:
    v = Verifier.from_password("pencil", iterations=4096)
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", v.salt, 4096)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    assert v.stored_key == hashlib.sha256(client_key).digest()
    assert v.server_key == hmac.new(salted, b"Server Key", "sha256").digest()


def test_verifier_salts_differ_between_calls() -> None:
    assert Verifier.from_password("same").salt != Verifier.from_password("same").salt


@pytest.mark.parametrize(
    "text",
    [
        "md5abcdef",
        "SCRAM-SHA-1$4096:c2FsdA==$c3RvcmVk:c2VydmVy",
        "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk",  # no ServerKey
        "SCRAM-SHA-256$many:c2FsdA==$c3RvcmVk:c2VydmVy",  # iterations not a number
        "SCRAM-SHA-256$4096:not base64!$c3RvcmVk:c2VydmVy",
        "",
    ],
)
def test_verifier_decode_rejects_what_is_not_a_verifier(text: str) -> None:
    with pytest.raises(ValueError, match="not a SCRAM-SHA-256 verifier"):
        Verifier.decode(text)


def test_write_verifier_never_stores_the_password(tmp_path: Path) -> None:
    path = tmp_path / "agents.auth"
    password = "correct horse battery staple"
    write_verifier(path, "agent-1", password)
    text = path.read_text()
    for leak in (
        password,
        base64.b64encode(password.encode()).decode(),
        password.encode().hex(),
        hashlib.md5(password.encode()).hexdigest(),
    ):
        assert leak not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    name, _, secret = text.strip().partition(":")
    assert name == "agent-1"
    assert Verifier.decode(secret).iterations == 4096


def test_write_verifier_replaces_only_that_agent(tmp_path: Path) -> None:
    path = tmp_path / "agents.auth"
    path.write_text("# agents of the analytics team\n")
    write_verifier(path, "agent-1", "one")
    write_verifier(path, "agent-2", "two")
    first = load_verifiers(path)
    write_verifier(path, "agent-1", "uno")
    second = load_verifiers(path)
    assert set(second) == {"agent-1", "agent-2"}
    assert second["agent-2"] == first["agent-2"]
    assert second["agent-1"] != first["agent-1"]
    assert path.read_text().startswith("# agents of the analytics team\n")
    client, server, _ = exchange("agent-1", second["agent-1"], "uno")
    client.set_server_final(server.final(client.get_client_final().encode()).decode())


@pytest.mark.parametrize("name", ["", "a:b", "a\nb"])
def test_write_verifier_refuses_bad_agent_ids(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="agent id"):
        write_verifier(tmp_path / "agents.auth", name, "pw")
    assert not (tmp_path / "agents.auth").exists()


def test_load_verifiers_names_the_bad_line(tmp_path: Path) -> None:
    good = Verifier.from_password("pw").encode()
    path = tmp_path / "agents.auth"
    path.write_text(f"# comment\n\nagent-1:{good}\nagent-2:SCRAM-SHA-256$bogus\n")
    with pytest.raises(ConfigError) as info:
        load_verifiers(path)
    assert f"{path}, line 4" in str(info.value)
    assert "not a SCRAM-SHA-256 verifier" in str(info.value)

    path.write_text(f"agent-1:{good}\njust-a-name\n")
    with pytest.raises(ConfigError) as info:
        load_verifiers(path)
    assert "line 2" in str(info.value) and "agent-id:SCRAM-SHA-256$" in str(info.value)


def test_load_verifiers_missing_file_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_verifiers(tmp_path / "nope.auth")
    assert "nope.auth" in str(info.value) and "guardproxy passwd" in str(info.value)


# ---------------------------------------------------------------- the exchange


def test_full_exchange_succeeds_with_the_right_password() -> None:
    verifier = Verifier.from_password("right")
    client, server, server_first = exchange("agent-1", verifier, "right")
    fields = parse_server_first(server_first)
    assert base64.b64decode(fields["s"]) == verifier.salt
    assert fields["i"] == "4096"
    server_final = server.final(client.get_client_final().encode())
    client.set_server_final(server_final.decode())  # raises if the server's proof is wrong
    assert server_final.startswith(b"v=")


def test_exchange_fails_with_a_wrong_password() -> None:
    client, server, _ = exchange("agent-1", Verifier.from_password("right"), "wrong")
    with pytest.raises(AuthFailed) as info:
        server.final(client.get_client_final().encode())
    assert info.value.message == "password authentication failed"
    assert info.value.sqlstate == "28P01"


def test_unknown_agent_fails_exactly_like_a_wrong_password() -> None:
    known = Verifier.from_password("right")
    k_client, k_server, k_first = exchange("agent-1", known, "wrong", NONCE)
    u_client, u_server, u_first = exchange("ghost", None, "wrong", NONCE)

    with pytest.raises(AuthFailed) as k_err:
        k_server.final(k_client.get_client_final().encode())
    with pytest.raises(AuthFailed) as u_err:
        u_server.final(u_client.get_client_final().encode())
    assert (type(u_err.value), u_err.value.message, u_err.value.sqlstate) == (
        type(k_err.value),
        k_err.value.message,
        k_err.value.sqlstate,
    )
    # The first answer has the same shape: same fields, same iterations, same salt size.
    k, u = parse_server_first(k_first), parse_server_first(u_first)
    assert list(k) == list(u) == ["r", "s", "i"]
    assert k["i"] == u["i"]
    assert len(base64.b64decode(k["s"])) == len(base64.b64decode(u["s"]))
    assert u["r"].startswith(NONCE) and len(u["r"]) == len(k["r"])


def test_unknown_agent_gets_a_stable_salt() -> None:
    # A salt that changed on every attempt would tell an attacker the agent does not exist.
    s1 = parse_server_first(exchange("ghost", None, "x")[2])["s"]
    s2 = parse_server_first(exchange("ghost", None, "y")[2])["s"]
    s3 = parse_server_first(exchange("ghost-2", None, "x")[2])["s"]
    assert s1 == s2
    assert s1 != s3


def test_unknown_agent_fails_even_with_the_decoy_derived_keys() -> None:
    # Whatever the client sends, an unknown agent never logs in.
    client, server, _ = exchange("ghost", None, "")
    with pytest.raises(AuthFailed):
        server.final(client.get_client_final().encode())


@pytest.mark.parametrize("first", [b"garbage", b"p=tls-server-end-point,,n=a,r=x", b"\xff\xfe"])
def test_malformed_client_first_is_an_auth_failure(first: bytes) -> None:
    with pytest.raises(AuthFailed):
        ServerExchange("agent-1", Verifier.from_password("pw")).first(first)


def test_malformed_client_final_is_an_auth_failure() -> None:
    _, server, _ = exchange("agent-1", Verifier.from_password("pw"), "pw")
    with pytest.raises(AuthFailed, match="password authentication failed"):
        server.final(b"c=biws,r=wrongnonce,p=AAAA")


def libpq_style_exchange(server: ServerExchange, password: str) -> bytes:
    """The client side as libpq writes it: an empty user name (``n=``), RFC 5802 by hand."""
    bare = "n=,r=" + NONCE
    server_first = server.first(("n,," + bare).encode()).decode()
    attrs = parse_server_first(server_first)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]),
                                 int(attrs["i"]))  # fmt: skip
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    without_proof = f"c=biws,r={attrs['r']}"
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, "sha256").digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    server_final = server.final(f"{without_proof},p={base64.b64encode(proof).decode()}".encode())
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    expected = hmac.new(server_key, auth_message, "sha256").digest()
    assert server_final.decode() == "v=" + base64.b64encode(expected).decode()
    return server_final


def test_exchange_with_an_empty_scram_user_name_as_libpq_sends() -> None:
    # libpq (psql, psycopg) and the JDBC driver send "n=," and rely on the startup user,
    # exactly as Postgres does; the proxy must accept that or no libpq client can log in.
    verifier = Verifier.from_password("pw")
    libpq_style_exchange(ServerExchange("agent-1", verifier), "pw")
    with pytest.raises(AuthFailed, match="password authentication failed"):
        libpq_style_exchange(ServerExchange("agent-1", verifier), "wrong")


def test_client_exchange_against_server_exchange() -> None:
    """The proxy's own client side (used towards Postgres) speaks to its server side."""
    verifier = Verifier.from_password("pw")
    client = ClientExchange("agent-1", "pw")
    server = ServerExchange("agent-1", verifier)
    server_first = server.first(client.first())
    server_final = server.final(client.final(server_first))
    client.verify(server_final)
    bad = ClientExchange("agent-1", "pw")
    other = ServerExchange("agent-1", Verifier.from_password("other"))
    with pytest.raises(AuthFailed):
        other.final(bad.final(other.first(bad.first())))
