"""Verification keys of token issuers, read from files and re-read when the files change.

Each key is bound to exactly one algorithm, decided by the key itself, never by a
token: an RSA key verifies RS256 only, a P-256 key ES256 only, an Ed25519 key EdDSA
only, an HMAC secret HS256 only. So a token cannot choose how its key is used (the
"algorithm confusion" attack: an RS256 public key taken as an HS256 secret).

Files (``delegation_issuers[].key_file`` / ``jwks_file``):

* ``key_file``: a PEM public key or certificate (a private key is accepted too and
  only its public half is kept), or anything else: an HMAC secret, its bytes with
  surrounding whitespace removed, at least 32 of them;
* ``jwks_file``: a JWKS document ``{"keys": [...]}`` (or a single JWK). Keys whose
  ``use`` is not ``sig``, whose algorithm is not one of EdDSA, ES256, RS256, HS256,
  or that cannot be read are skipped; a document with no usable key is an error
  that lists why each was skipped.

`KeySource.keys()` returns the current keys; it stats the file on each call (calls
come with logins and ``SET guard.token``, not with statements) and re-reads it when
its modification time, size or inode changed. A file that cannot be read (or has no
usable key) raises `KeyFileError` if no keys were ever read; otherwise the previous
keys stay in use and one warning per change of the file says why.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_pem_public_key,
)
from jwt import PyJWK
from jwt.algorithms import get_default_algorithms
from jwt.exceptions import PyJWTError

from guardproxy.config import TOKEN_ALGORITHMS

from .errors import KeyFileError

log = logging.getLogger("guardproxy.delegation")

MIN_HMAC_BYTES = 32
MIN_RSA_BITS = 2048
MAX_KEY_FILE = 1 << 20  # a JWKS of a few dozen keys is a few KB


@dataclass(frozen=True)
class VerificationKey:
    algorithm: str  # one of TOKEN_ALGORITHMS
    key: Any  # a cryptography public key, or bytes (HS256)
    kid: str | None = None


def key_algorithm(key: object) -> str:
    """The one algorithm a public key verifies; KeyFileError for keys guardproxy refuses."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyFileError(f"RSA key of {key.key_size} bits: at least {MIN_RSA_BITS} needed")
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise KeyFileError(f"EC key on curve {key.curve.name}: ES256 needs P-256")
        return "ES256"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise KeyFileError(f"{type(key).__name__} keys are not supported (EdDSA, ES256, RS256)")


def parse_pem(data: bytes) -> VerificationKey:
    """A PEM public key, certificate or private key (its public half)."""
    public: object
    try:
        if b"CERTIFICATE" in data:
            public = x509.load_pem_x509_certificate(data).public_key()
        elif b"PRIVATE KEY" in data:
            public = load_pem_private_key(data, password=None).public_key()
        else:
            public = load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"not a PEM key or certificate guardproxy can read: {exc}") from None
    return VerificationKey(key_algorithm(public), public)


def parse_secret(data: bytes) -> VerificationKey:
    secret = data.strip()
    if len(secret) < MIN_HMAC_BYTES:
        raise KeyFileError(
            f"an HMAC secret of {len(secret)} bytes: HS256 needs at least {MIN_HMAC_BYTES} "
            "(or give a PEM public key)"
        )
    try:  # PyJWT refuses secrets that look like public keys (ssh-rsa ..., PEM)
        get_default_algorithms()["HS256"].prepare_key(secret)
    except PyJWTError as exc:
        raise KeyFileError(f"not usable as an HMAC secret: {exc}") from None
    return VerificationKey("HS256", secret)


def parse_jwk(jwk: object) -> VerificationKey:
    """One JWK; KeyFileError saying why it cannot be used."""
    if not isinstance(jwk, dict):
        raise KeyFileError("not a JSON object")
    if jwk.get("use", "sig") != "sig":
        raise KeyFileError(f"use is {jwk.get('use')!r}, not 'sig'")
    alg = jwk.get("alg")
    if alg is not None and alg not in TOKEN_ALGORITHMS:
        raise KeyFileError(f"alg {alg!r} is not one of {', '.join(TOKEN_ALGORITHMS)}")
    try:
        parsed = PyJWK(jwk)
    except (PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise KeyFileError(str(exc)) from None
    kid = jwk.get("kid") if isinstance(jwk.get("kid"), str) else None
    if parsed.algorithm_name == "HS256":
        secret = parsed.key
        if not isinstance(secret, bytes) or len(secret) < MIN_HMAC_BYTES:
            raise KeyFileError(f"an oct key shorter than {MIN_HMAC_BYTES} bytes")
        return VerificationKey("HS256", secret, kid)
    key = parsed.key
    if hasattr(key, "public_key") and not isinstance(
        key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
    ):
        key = key.public_key()  # a private JWK: keep its public half
    algorithm = key_algorithm(key)
    if parsed.algorithm_name != algorithm:
        raise KeyFileError(f"alg {parsed.algorithm_name} does not fit a key for {algorithm}")
    return VerificationKey(algorithm, key, kid)


def parse_jwks(data: bytes) -> list[VerificationKey]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"not JSON: {exc}") from None
    entries = doc.get("keys") if isinstance(doc, dict) and "keys" in doc else [doc]
    if not isinstance(entries, list):
        raise KeyFileError('expected {"keys": [...]} (a JWKS document)')
    keys: list[VerificationKey] = []
    problems: list[str] = []
    for i, entry in enumerate(entries):
        kid = entry.get("kid") if isinstance(entry, dict) else None
        try:
            keys.append(parse_jwk(entry))
        except KeyFileError as exc:
            problems.append(f"key {kid or i}: {exc}")
    if not keys:
        why = "; ".join(problems) if problems else "the document lists no keys"
        raise KeyFileError(f"no usable key ({why})")
    return keys


def parse_key_file(data: bytes) -> list[VerificationKey]:
    """The keys of a ``key_file``: PEM, a JWK / JWKS in JSON, or an HMAC secret."""
    text = data.lstrip()
    if text.startswith(b"-----BEGIN"):
        return [parse_pem(data)]
    if text.startswith(b"{"):
        return parse_jwks(data)
    return [parse_secret(data)]


@dataclass
class KeySource:
    """The keys of one file, re-read when the file changes (see the module docstring)."""

    path: Path
    jwks: bool  # a jwks_file (JSON only) rather than a key_file
    _keys: list[VerificationKey] | None = None
    _stamp: tuple[int, int, int] | None = None
    _warned: tuple[int, int, int] | None = field(default=None, repr=False)

    def keys(self) -> list[VerificationKey]:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError as exc:
            return self._fallback(None, f"cannot read {self.path}: {exc.strerror}")
        if self._keys is not None and stamp == self._stamp:
            return self._keys
        try:
            if st.st_size > MAX_KEY_FILE:
                raise KeyFileError(f"larger than {MAX_KEY_FILE} bytes")
            data = self.path.read_bytes()
            keys = parse_jwks(data) if self.jwks else parse_key_file(data)
        except OSError as exc:
            return self._fallback(stamp, f"cannot read {self.path}: {exc.strerror}")
        except KeyFileError as exc:
            return self._fallback(stamp, f"{self.path}: {exc}")
        if self._keys is not None:
            log.info("delegation keys re-read from %s (%d keys)", self.path, len(keys))
        self._keys, self._stamp, self._warned = keys, stamp, None
        return keys

    def _fallback(self, stamp: tuple[int, int, int] | None, problem: str) -> list[VerificationKey]:
        if self._keys is None:
            raise KeyFileError(problem)
        if self._warned != (stamp or (0, 0, 0)):
            self._warned = stamp or (0, 0, 0)
            log.warning("%s; the keys read before stay in use", problem)
        return self._keys
