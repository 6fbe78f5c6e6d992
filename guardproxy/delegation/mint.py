"""Minting delegation tokens, for development and tests (``guardproxy token mint``).

An application mints its tokens with any JWT library (docs/delegation.md shows
PyJWT); this module does the same for the CLI and the tests:

* `load_signing_key(path)`: a PEM private key (Ed25519 -> EdDSA, P-256 -> ES256,
  RSA -> RS256) or an HMAC secret file (HS256, at least 32 bytes);
* `mint(key, agent=..., principals=..., ...)`: a signed token with every claim the
  verifier requires (iss, sub, aud, jti, iat, exp) and the optional ones;
* `generate_key(algorithm)`: a new private key as PEM, and its public half (the file
  the operator names in ``delegation_issuers[].key_file``);
* `parse_tables(text)`: ``orders:select+update,customers`` -> the ``narrow.tables`` claim.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .claims import TABLE_OPS
from .errors import KeyFileError
from .keys import MIN_HMAC_BYTES, key_algorithm


@dataclass(frozen=True)
class SigningKey:
    algorithm: str
    key: Any  # a cryptography private key, or bytes (HS256)
    kid: str | None = None


def load_signing_key(path: Path, kid: str | None = None) -> SigningKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from None
    if b"PRIVATE KEY" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{path}: not a PEM private key guardproxy can use: {exc}") from None
        return SigningKey(key_algorithm(key.public_key()), key, kid)
    if data.lstrip().startswith(b"-----BEGIN"):
        raise KeyFileError(f"{path}: a public key or certificate cannot sign; give the private key")
    secret = data.strip()
    if len(secret) < MIN_HMAC_BYTES:
        raise KeyFileError(f"{path}: an HMAC secret needs at least {MIN_HMAC_BYTES} bytes")
    return SigningKey("HS256", secret, kid)


def mint(
    key: SigningKey,
    *,
    agent: str,
    principals: Sequence[str | int],
    issuer: str,
    audience: str = "guardproxy",
    task: str | None = None,
    ttl: float = 900.0,
    narrow: dict[str, Any] | None = None,
    token_id: str | None = None,
    now: float | None = None,
) -> str:
    now = time.time() if now is None else now
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": agent,
        "aud": audience,
        "jti": token_id or secrets.token_hex(12),
        "iat": int(now),
        "exp": int(now + ttl),
        "principals": list(principals),
    }
    if task is not None:
        claims["task"] = task
    if narrow is not None:
        claims["narrow"] = narrow
    headers = {"kid": key.kid} if key.kid else None
    return jwt.encode(claims, key.key, algorithm=key.algorithm, headers=headers)


def generate_key(algorithm: str) -> tuple[bytes, bytes]:
    """(private key PEM, public key PEM) for EdDSA, ES256 or RS256; (secret, secret) for HS256."""
    if algorithm == "HS256":
        secret = secrets.token_urlsafe(48).encode() + b"\n"
        return secret, secret
    private: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if algorithm == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    elif algorithm == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    else:
        raise ValueError(f"algorithm must be EdDSA, ES256, RS256 or HS256; got {algorithm!r}")
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, public


def parse_tables(text: str) -> dict[str, list[str]] | list[str]:
    """``orders:select+update,customers`` -> the ``narrow.tables`` claim.

    A table without ``:ops`` keeps the operations the policy allows on it; with no
    ops anywhere the claim is a plain list of names. ValueError says what is wrong.
    """
    entries: dict[str, list[str] | None] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, ops_text = item.partition(":")
        ops = [o.strip().lower() for o in ops_text.split("+") if o.strip()] if sep else None
        bad = [o for o in ops or () if o not in TABLE_OPS]
        if bad or (sep and not ops):
            raise ValueError(
                f"{item!r}: write TABLE or TABLE:OP+OP with ops among {', '.join(TABLE_OPS)}"
            )
        entries[name.strip()] = ops
    if all(ops is None for ops in entries.values()):
        return list(entries)
    return {name: ops if ops is not None else list(TABLE_OPS) for name, ops in entries.items()}
