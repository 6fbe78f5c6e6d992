"""SCRAM-SHA-256 verifiers and exchanges (pure; scramp does the cryptography).

Verifier file format, one agent per line, same text as Postgres' ``rolpassword``::

    agent-id:SCRAM-SHA-256$<iterations>:<salt b64>$<StoredKey b64>:<ServerKey b64>

Plaintext passwords are never stored. Lines starting with ``#`` are comments.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import scramp

from guardproxy.protocol.errors import AuthFailed, ConfigError

MECHANISM = "SCRAM-SHA-256"
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
        salt, stored, server, iters = _mech.make_auth_info(password, iteration_count=iterations)
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
    """Server side of one SCRAM login: feed the client's messages, send what it returns."""

    def __init__(self, agent_id: str, verifier: Verifier | None) -> None:
        v = verifier or _decoy(agent_id)
        self._known = verifier is not None
        self._server = _mech.make_server(
            lambda _user: (v.salt, v.stored_key, v.server_key, v.iterations)
        )

    def first(self, client_first: bytes) -> bytes:
        try:
            self._server.set_client_first(client_first.decode())
            return str(self._server.get_server_first()).encode()
        except (scramp.ScramException, UnicodeDecodeError) as exc:
            raise AuthFailed(f"SCRAM exchange failed: {exc}") from exc

    def final(self, client_final: bytes) -> bytes:
        try:
            self._server.set_client_final(client_final.decode())
        except (scramp.ScramException, UnicodeDecodeError) as exc:
            raise AuthFailed("password authentication failed") from exc
        if not self._known:
            raise AuthFailed("password authentication failed")
        return str(self._server.get_server_final()).encode()


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
