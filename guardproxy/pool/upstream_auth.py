"""The proxy's own login to Postgres, as a sans-IO state machine: no sockets here.

The caller sends the StartupMessage, then hands every Authentication message
('R') the server sends to `UpstreamAuth.receive`, and sends what it returns. Any
other message before the login is complete goes through `check_authenticated`
(an ErrorResponse is the caller's to report). What is accepted:

* trust: AuthenticationOk straight away;
* md5: the salted hash of the DSN's password;
* SCRAM-SHA-256 (scramp does the cryptography), with ``tls-server-end-point``
  channel binding (SCRAM-SHA-256-PLUS) when the connection is TLS, the caller
  passes the binding data and the server offers it. The server must prove that it
  knows the password too: its final signature is verified, and AuthenticationOk
  before a verified SASLFinal, a wrong signature, a nonce that does not extend
  ours, or an absurd iteration count all end the login. A server that cannot
  prove itself is an impostor: it would receive the agents' statements.
* cleartext password: refused, unless the operator allowed it
  (``upstream_allow_cleartext``) and the connection is TLS.

Everything else (GSSAPI, SSPI, Kerberos, messages out of order, malformed ones) is
refused. Each refusal is an UpstreamError saying what the server did and what to
change; the password never appears in one.
"""

from __future__ import annotations

import enum
import hashlib
import ssl

import scramp
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from guardproxy.protocol import codec
from guardproxy.protocol.errors import ProtocolViolation, UpstreamError
from guardproxy.protocol.scram import MECHANISM, MECHANISM_PLUS, md5_password

# PBKDF2 rounds a server may ask for: Postgres uses 4096 by default; each connection
# computes them on the event loop, so a hostile server must not make that take minutes.
MAX_SCRAM_ITERATIONS = 1_000_000

AUTH_OK, AUTH_CLEARTEXT, AUTH_MD5 = 0, 3, 5
AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 10, 11, 12
_UNSUPPORTED = {2: "Kerberos V5", 6: "SCM credentials", 7: "GSSAPI", 8: "GSSAPI", 9: "SSPI"}


class Phase(enum.Enum):
    START = "waiting for the server's first authentication request"
    PASSWORD_SENT = "password sent, waiting for AuthenticationOk"
    SASL_STARTED = "SCRAM started, waiting for SASLContinue"
    SASL_PROVED = "SCRAM proof sent, waiting for SASLFinal"
    SASL_VERIFIED = "server signature verified, waiting for AuthenticationOk"
    DONE = "authenticated"


class UpstreamAuth:
    """One login of the proxy to one upstream server (see the module docstring)."""

    def __init__(
        self,
        user: str,
        password: str | None,
        *,
        where: str,
        tls: bool,
        allow_cleartext: bool = False,
        channel_binding: bytes | None = None,
    ) -> None:
        # where: "host:port", for messages; channel_binding: tls-server-end-point data
        # of the server's certificate (see tls_server_end_point), only with tls
        self.user = user
        self.where = where
        self.tls = tls
        self.allow_cleartext = allow_cleartext
        self.channel_binding = channel_binding if tls else None
        self.phase = Phase.START
        self.method = "trust"  # what the server asked for: trust, md5, cleartext, SCRAM...
        self._password = password
        self._scram: scramp.ScramClient | None = None

    @property
    def authenticated(self) -> bool:
        return self.phase is Phase.DONE

    def receive(self, raw: bytes) -> bytes | None:
        """Takes one whole Authentication message; returns the message to send next, or
        None (nothing to send). Raises UpstreamError when the login must end."""
        if raw[:1] != b"R":
            raise self._refuse(f"UpstreamAuth got a {raw[:1]!r} message, not 'R'")
        try:
            code = codec.auth_code(raw)
        except ProtocolViolation as exc:
            raise self._refuse(f"sent a malformed authentication message ({exc.message})") from None
        data = raw[9:]
        phase = self.phase
        if code == AUTH_OK:
            if phase in (Phase.START, Phase.PASSWORD_SENT, Phase.SASL_VERIFIED):
                self.phase = Phase.DONE
                return None
            if phase in (Phase.SASL_STARTED, Phase.SASL_PROVED):
                raise self._refuse(
                    "said the login succeeded before proving, with SCRAM's final message, that "
                    "it knows the password: it may be an impostor"
                )
        elif phase is Phase.START and code not in (AUTH_SASL_CONTINUE, AUTH_SASL_FINAL):
            return self._first_request(code, data)
        elif code == AUTH_SASL_CONTINUE and phase is Phase.SASL_STARTED:
            return self._sasl_continue(data)
        elif code == AUTH_SASL_FINAL and phase is Phase.SASL_PROVED:
            self._sasl_final(data)
            return None
        raise self._refuse(f"sent authentication request {code} while {phase.value}")

    def check_authenticated(self, kind: int) -> None:
        """For a message other than 'R' and 'E': refuses it before AuthenticationOk (a
        server that skips, or cuts short, the login)."""
        if self.phase is not Phase.DONE:
            raise self._refuse(
                f"sent a {chr(kind)!r} message while {self.phase.value}: it skipped authentication"
            )

    # ------------------------------------------------------------ requests

    def _first_request(self, code: int, data: bytes) -> bytes:
        if code in _UNSUPPORTED:
            raise self._refuse(
                f"asks for {_UNSUPPORTED[code]} authentication, which guardproxy does not speak",
                hint="use scram-sha-256 for guardproxy's role in pg_hba.conf",
            )
        if code not in (AUTH_CLEARTEXT, AUTH_MD5, AUTH_SASL):
            raise self._refuse(f"asks for unknown authentication (code {code})")
        password = self._password
        if password is None:
            raise UpstreamError(
                f"upstream {self.where} asks for a password for role {self.user!r} and the "
                "upstream DSN has none",
                sqlstate="28P01",
            )
        if code == AUTH_CLEARTEXT:
            self.method = "cleartext"
            self._check_cleartext()
            self.phase = Phase.PASSWORD_SENT
            return codec.build_password(password.encode() + b"\x00")
        if code == AUTH_MD5:
            if len(data) != 4:
                raise self._refuse("sent an md5 request without its 4-byte salt")
            self.method = "md5"
            self.phase = Phase.PASSWORD_SENT
            return codec.build_password(md5_password(self.user, password, data) + b"\x00")
        return self._sasl_start(data, password)

    def _check_cleartext(self) -> None:
        if not self.allow_cleartext:
            raise self._refuse(
                "asks for the password in cleartext; guardproxy does not send it",
                hint="use scram-sha-256 for guardproxy's role in pg_hba.conf, or set "
                "upstream_allow_cleartext: true (it is used over TLS only)",
                sqlstate="28000",
            )
        if not self.tls:
            raise self._refuse(
                "asks for the password in cleartext over a connection that is not TLS; "
                "upstream_allow_cleartext allows it over TLS only",
                hint="use sslmode=verify-full in the upstream DSN",
                sqlstate="28000",
            )

    # ------------------------------------------------------------ SCRAM

    def _sasl_start(self, data: bytes, password: str) -> bytes:
        offered = [m.decode(errors="replace") for m in data.split(b"\x00") if m]
        binding = self.channel_binding
        if binding is not None and MECHANISM_PLUS in offered:
            mechanism = MECHANISM_PLUS
        elif MECHANISM in offered:
            mechanism = MECHANISM
        else:
            raise self._refuse(
                f"offers SASL mechanisms {offered}, none of which guardproxy speaks "
                f"({MECHANISM}, {MECHANISM_PLUS})"
            )
        # With binding data but no -PLUS offered, scramp sends the "y" flag: a server
        # that can bind (every Postgres over TLS) then sees that -PLUS was stripped.
        cb = ("tls-server-end-point", binding) if binding is not None else None
        try:
            self._scram = scramp.ScramClient([mechanism], self.user, password, channel_binding=cb)
            first = self._scram.get_client_first().encode()
        except scramp.ScramException as exc:
            raise self._refuse(f"cannot start SCRAM: {exc}") from None
        self.method = mechanism
        self.phase = Phase.SASL_STARTED
        return codec.build_sasl_initial(mechanism, first)

    def _sasl_continue(self, data: bytes) -> bytes:
        assert self._scram is not None
        text = self._text(data, "SASLContinue")
        attrs = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
        iterations = attrs.get("i", "")
        if not iterations.isdigit() or not 0 < int(iterations) <= MAX_SCRAM_ITERATIONS:
            raise self._refuse(
                f"asks for {iterations or 'no'} SCRAM iterations; at most "
                f"{MAX_SCRAM_ITERATIONS:,} are computed"
            )
        try:
            self._scram.set_server_first(text)
            final = self._scram.get_client_final().encode()
        except Exception as exc:  # scramp's parsers raise several kinds on hostile input
            raise self._refuse(f"sent an invalid SCRAM server-first message: {exc}") from None
        self.phase = Phase.SASL_PROVED
        return codec.build_password(final)

    def _sasl_final(self, data: bytes) -> None:
        assert self._scram is not None
        text = self._text(data, "SASLFinal")
        try:
            self._scram.set_server_final(text)  # checks the server signature (v=...)
        except Exception as exc:  # scramp's parsers raise several kinds on hostile input
            raise self._refuse(
                f"failed to prove that it knows the password (SCRAM server signature: {exc}): "
                "it may be an impostor"
            ) from None
        self.phase = Phase.SASL_VERIFIED

    def _text(self, data: bytes, what: str) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise self._refuse(f"sent a {what} message that is not UTF-8") from None

    def _refuse(self, what: str, hint: str | None = None, sqlstate: str = "08006") -> UpstreamError:
        return UpstreamError(
            f"upstream {self.where} {what} (login of role {self.user!r} refused by guardproxy)",
            hint=hint,
            sqlstate=sqlstate,
        )


def tls_server_end_point(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> bytes | None:
    """Channel-binding data of a TLS connection's server certificate (RFC 5929), or
    None without TLS or certificate. The hash is the certificate's signature hash,
    SHA-256 in place of MD5 and SHA-1."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
        algorithm = cert.signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm):
        return None  # an unusual certificate: no binding rather than a wrong one
    name = algorithm.name if algorithm is not None else "sha256"
    if name in ("md5", "sha1"):
        name = "sha256"
    return hashlib.new(name, der).digest()
