"""TLS towards clients (require, verify-full, client certificates, SCRAM-SHA-256-PLUS,
certificate reload) and towards the upstream (sslmode=verify-full), with real clients."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import struct
import time
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from guardproxy.protocol.scram import write_verifier


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    subject: str, issuer_key, issuer: x509.Name, ca: bool, san: bool, serial: int | None = None
):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def _write(path: Path, key, cert) -> tuple[Path, Path]:
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _issue(
        "guardproxy test CA", None, _name("guardproxy test CA"), ca=True, san=False
    )
    ca_crt, _ = _write(d / "ca", ca_key, ca_cert)
    skey, scert = _issue("localhost", ca_key, ca_cert.subject, ca=False, san=True)
    server_crt, server_key = _write(d / "server", skey, scert)
    ckey, ccert = _issue("agent-cert", ca_key, ca_cert.subject, ca=False, san=False)
    client_crt, client_key = _write(d / "client", ckey, ccert)
    other_key, other_cert = _issue("other CA", None, _name("other CA"), ca=True, san=False)
    other_ca, _ = _write(d / "other", other_key, other_cert)
    return {
        "dir": d,
        "ca": ca_crt,
        "ca_key": ca_key,
        "ca_cert": ca_cert,
        "server_crt": server_crt,
        "server_key": server_key,
        "client_crt": client_crt,
        "client_key": client_key,
        "other_ca": other_ca,
    }


def tls_proxy(start_proxy, pki, **settings):
    return start_proxy(tls_cert_file=pki["server_crt"], tls_key_file=pki["server_key"], **settings)


def test_sslmode_require_uses_tls_and_reaches_postgres(start_proxy, pki) -> None:
    proxy = tls_proxy(start_proxy, pki)
    with psycopg.connect(proxy.dsn("agent-1") + "?sslmode=require", connect_timeout=10) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select current_user").fetchone() == ("app_owner",)


def test_verify_full_accepts_our_ca_and_rejects_another(start_proxy, pki) -> None:
    proxy = tls_proxy(start_proxy, pki)
    good = f"{proxy.dsn('agent-1')}?sslmode=verify-full&sslrootcert={pki['ca']}"
    with psycopg.connect(good, connect_timeout=10) as conn:
        assert conn.pgconn.ssl_in_use and conn.execute("select 1").fetchone() == (1,)
    bad = f"{proxy.dsn('agent-1')}?sslmode=verify-full&sslrootcert={pki['other_ca']}"
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(bad, connect_timeout=10)


def test_tls_mode_require_refuses_plaintext_with_a_clear_message(start_proxy, pki) -> None:
    proxy = tls_proxy(start_proxy, pki, tls_mode="require")
    with pytest.raises(psycopg.OperationalError, match="requires TLS"):
        psycopg.connect(proxy.dsn("agent-1") + "?sslmode=disable", connect_timeout=10)
    with psycopg.connect(proxy.dsn("agent-1") + "?sslmode=require", connect_timeout=10) as conn:
        assert conn.pgconn.ssl_in_use


def test_scram_with_channel_binding_over_tls(start_proxy, pki, tmp_path) -> None:
    auth = tmp_path / "agents.auth"
    write_verifier(auth, "agent-cb", "s3cret")
    proxy = tls_proxy(start_proxy, pki, auth_mode="scram", auth_file=auth)
    dsn = f"{proxy.dsn('agent-cb', 's3cret')}?sslmode=require&channel_binding=require"
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            f"{proxy.dsn('agent-cb', 'wrong')}?sslmode=require&channel_binding=require",
            connect_timeout=10,
        )


def test_client_certificate_names_the_agent(start_proxy, pki) -> None:
    proxy = tls_proxy(start_proxy, pki, auth_mode="cert", tls_client_ca_file=pki["ca"])
    base = f"sslmode=require&sslcert={pki['client_crt']}&sslkey={pki['client_key']}"
    with psycopg.connect(f"{proxy.dsn('agent-cert')}?{base}", connect_timeout=10) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="certificate authentication failed"):
        psycopg.connect(f"{proxy.dsn('someone-else')}?{base}", connect_timeout=10)
    with pytest.raises(psycopg.OperationalError, match="certificate authentication failed"):
        psycopg.connect(f"{proxy.dsn('agent-cert')}?sslmode=require", connect_timeout=10)


def _served_certificate(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(struct.pack("!ii", 8, 80877103))
        assert raw.recv(1) == b"S"
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der


def test_certificate_files_are_reloaded_without_restart(start_proxy, pki, tmp_path) -> None:
    crt, key = tmp_path / "live.crt", tmp_path / "live.key"
    crt.write_bytes(pki["server_crt"].read_bytes())
    key.write_bytes(pki["server_key"].read_bytes())
    proxy = start_proxy(tls_cert_file=crt, tls_key_file=key)
    before = _served_certificate(proxy.port)
    new_key, new_cert = _issue(
        "localhost", pki["ca_key"], pki["ca_cert"].subject, ca=False, san=True
    )
    time.sleep(0.05)  # a different mtime
    _write(tmp_path / "live", new_key, new_cert)
    after = _served_certificate(proxy.port)
    assert before != after
    assert after == new_cert.public_bytes(serialization.Encoding.DER)
    assert proxy.alive()


def test_upstream_over_tls_with_verify_full(start_proxy, pki) -> None:
    # the upstream is a TLS-serving guardproxy in front of Postgres: a real SSLRequest and handshake
    front = tls_proxy(start_proxy, pki)
    upstream = f"postgresql://app_owner@127.0.0.1:{front.port}/app?sslmode=verify-full&sslrootcert={pki['ca']}"
    chained = start_proxy(upstream=upstream)
    with psycopg.connect(chained.dsn("agent-1"), connect_timeout=10) as conn:
        assert conn.execute("select current_user").fetchone() == ("app_owner",)
    wrong = f"postgresql://app_owner@127.0.0.1:{front.port}/app?sslmode=verify-full&sslrootcert={pki['other_ca']}"
    refused = start_proxy(upstream=wrong)
    with pytest.raises(
        psycopg.OperationalError, match=r"certificate verify failed|CERTIFICATE_VERIFY_FAILED"
    ):
        psycopg.connect(refused.dsn("agent-1"), connect_timeout=10)
