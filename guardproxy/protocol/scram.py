"""SCRAM-SHA-256 verifiers and exchanges (pure; scramp does the cryptography).

Verifier file format, one agent per line, same text as Postgres' ``rolpassword``::

    agent-id:SCRAM-SHA-256$<iterations>:<salt b64>$<StoredKey b64>:<ServerKey b64>

Plaintext passwords are never stored. Lines starting with ``#`` are comments.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

import scramp

from guardproxy.protocol.errors import AuthFailed, ConfigError

MECHANISM = "SCRAM-SHA-256"
MECHANISM_PLUS = "SCRAM-SHA-256-PLUS"
DEFAULT_ITERATIONS = 4096
_mech = scramp.ScramMechanism(MECHANISM)


@dataclass(frozen=True)
class Verifier:
    salt: bytes
    stored_key: bytes
    server_key: bytes
    iterations: int

    def encode(self) -> str:
        b64 = base64.b64encode
        return (
            f"{MECHANISM}${self.iterations}:{b64(self.salt).decode()}"
            f"${b64(self.stored_key).decode()}:{b64(self.server_key).decode()}"
        )

    @classmethod
    def decode(cls, text: str) -> Verifier:
        try:
            mech, rest = text.split("$", 1)
            iter_salt, keys = rest.split("$", 1)
            iterations, salt = iter_salt.split(":", 1)
            stored, server = keys.split(":", 1)
            if mech != MECHANISM:
                raise ValueError(f"mechanism {mech!r} is not {MECHANISM}")
            d = base64.b64decode
            return cls(
                d(salt, validate=True),
                d(stored, validate=True),
                d(server, validate=True),
                int(iterations),
            )
        except ValueError as exc:
            raise ValueError(f"not a SCRAM-SHA-256 verifier: {exc}") from exc

    @classmethod
    def from_password(cls, password: str, iterations: int = DEFAULT_ITERATIONS) -> Verifier:
        # 16-byte salt, as Postgres makes them (and as the decoy for unknown agents has)
        salt, stored, server, iters = _mech.make_auth_info(
            password, iteration_count=iterations, salt=os.urandom(16)
        )
        return cls(salt, stored, server, iters)


def load_verifiers(path: Path) -> dict[str, Verifier]:
    """Reads an auth file; raises ConfigError naming the line that is wrong."""
    verifiers: dict[str, Verifier] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(
            f"auth_file {path}: cannot read it ({exc.strerror}); create it with `guardproxy passwd NAME`"
        ) from exc
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, secret = line.partition(":")
        if not sep or not name:
            raise ConfigError(
                f"auth_file {path}, line {number}: expected 'agent-id:SCRAM-SHA-256$...'"
            )
        try:
            verifiers[name] = Verifier.decode(secret)
        except ValueError as exc:
            raise ConfigError(f"auth_file {path}, line {number}: {exc}") from exc
    return verifiers


def write_verifier(path: Path, name: str, password: str) -> None:
    """Adds or replaces ``name`` in the auth file, keeping other lines."""
    if not name or ":" in name or "\n" in name:
        raise ConfigError("agent id must be non-empty and contain no ':' or newline")
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [ln for ln in lines if ln.partition(":")[0] != name]
    kept.append(f"{name}:{Verifier.from_password(password).encode()}")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(kept) + "\n")
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def _decoy(name: str) -> Verifier:
    # An unknown agent gets a stable fake verifier, so the exchange looks the
    # same as for a known one and only fails at the proof: no user enumeration.
    seed = hashlib.sha256(b"guardproxy-decoy:" + name.encode()).digest()
    return Verifier(seed[:16], seed, seed, DEFAULT_ITERATIONS)


class ServerExchange:
    """Server side of one SCRAM-SHA-256 login (RFC 5802 / 7677), as Postgres runs it.

    Written out rather than taken from scramp because libpq sends an empty user
    name (``n=,``) in client-first, which Postgres ignores and scramp rejects.
    """

    def __init__(
        self,
        agent_id: str,
        verifier: Verifier | None,
        mechanism: str = MECHANISM,
        binding: bytes = b"",
    ) -> None:
        # binding: tls-server-end-point data when the client chose SCRAM-SHA-256-PLUS
        self._mechanism = mechanism
        self._binding = binding
        self._verifier = verifier or _decoy(agent_id)
        self._known = verifier is not None
        self._nonce = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._gs2_header = ""

    def first(self, client_first: bytes) -> bytes:
        try:
            text = client_first.decode()
        except UnicodeDecodeError as exc:
            raise AuthFailed("SCRAM client-first message is not UTF-8", sqlstate="08P01") from exc
        plus = self._mechanism == MECHANISM_PLUS
        if plus and not text.startswith("p=tls-server-end-point,"):
            raise AuthFailed(
                "SCRAM-SHA-256-PLUS needs channel binding type tls-server-end-point",
                sqlstate="08P01",
            )
        if not plus and not text.startswith(("n,", "y,")):
            raise AuthFailed(
                "channel binding was asked for without SCRAM-SHA-256-PLUS", sqlstate="08P01"
            )
        if text.startswith("y,") and self._binding:
            # the client could bind but believes we cannot: someone in the middle stripped -PLUS
            raise AuthFailed("SCRAM channel binding downgrade detected", sqlstate="28000")
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise AuthFailed("malformed SCRAM client-first message", sqlstate="08P01")
        self._gs2_header = parts[0] + "," + parts[1] + ","
        self._client_first_bare = parts[2]
        attrs = dict(a.split("=", 1) for a in parts[2].split(",") if "=" in a)
        client_nonce = attrs.get("r", "")
        if not client_nonce:
            raise AuthFailed("SCRAM client-first message has no nonce", sqlstate="08P01")
        self._nonce = client_nonce + base64.b64encode(os.urandom(18)).decode()
        v = self._verifier
        self._server_first = (
            f"r={self._nonce},s={base64.b64encode(v.salt).decode()},i={v.iterations}"
        )
        return self._server_first.encode()

    def final(self, client_final: bytes) -> bytes:
        try:
            text = client_final.decode()
            without_proof, _, proof_attr = text.rpartition(",p=")
            attrs = dict(a.split("=", 1) for a in without_proof.split(",") if "=" in a)
            proof = base64.b64decode(proof_attr, validate=True)
            binding_raw = base64.b64decode(attrs.get("c", ""), validate=True)
        except (UnicodeDecodeError, ValueError) as exc:
            raise AuthFailed("password authentication failed") from exc
        expected = self._gs2_header.encode() + (
            self._binding if self._mechanism == MECHANISM_PLUS else b""
        )
        if attrs.get("r") != self._nonce or binding_raw != expected:
            raise AuthFailed("password authentication failed")
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        v = self._verifier
        signature = hmac.new(v.stored_key, auth_message, hashlib.sha256).digest()
        if len(proof) != len(signature):
            raise AuthFailed("password authentication failed")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if (
            not hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key)
            or not self._known
        ):
            raise AuthFailed("password authentication failed")
        server_signature = hmac.new(v.server_key, auth_message, hashlib.sha256).digest()
        return b"v=" + base64.b64encode(server_signature)


class ClientExchange:
    """Client side of SCRAM, for the proxy logging in to Postgres."""

    def __init__(self, user: str, password: str) -> None:
        self._client = scramp.ScramClient([MECHANISM], user, password)

    def first(self) -> bytes:
        return str(self._client.get_client_first()).encode()

    def final(self, server_first: bytes) -> bytes:
        self._client.set_server_first(server_first.decode())
        return str(self._client.get_client_final()).encode()

    def verify(self, server_final: bytes) -> None:
        self._client.set_server_final(server_final.decode())


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()
