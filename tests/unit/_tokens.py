"""Keys and tokens made by the delegation tests themselves (no fixture files)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from guardproxy.config import DelegationIssuer
from guardproxy.delegation.mint import SigningKey, mint
from guardproxy.delegation.verify import Verifier

ISSUER = "shop-app"
NOW = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC: tests pass `now`, never the clock


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def private_key(alg: str) -> Any:
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(alg)


def public_pem(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def key_pair(alg: str, directory: Path, name: str = "issuer") -> tuple[SigningKey, Path]:
    """(what the application signs with, the file guardproxy verifies with)."""
    path = directory / f"{name}-{alg}.pub"
    if alg == "HS256":
        secret = b"s3cret-" + alg.encode() + b"-" + b"x" * 40
        path.write_bytes(secret + b"\n")
        return SigningKey("HS256", secret), path
    key = private_key(alg)
    path.write_bytes(public_pem(key))
    return SigningKey(alg, key), path


def issuer(path: Path, *, jwks: bool = False, **extra: Any) -> DelegationIssuer:
    data: dict[str, Any] = {"issuer": ISSUER, ("jwks_file" if jwks else "key_file"): str(path)}
    data.update(extra)
    return DelegationIssuer.model_validate(data)


def verifier(path: Path, *, jwks: bool = False, **extra: Any) -> Verifier:
    return Verifier([issuer(path, jwks=jwks, **extra)], clock_skew=30.0)


def token(key: SigningKey, **claims: Any) -> str:
    """A token of ISSUER for support-1 acting for 42 and 43, minted at NOW for 15 minutes;
    keyword arguments override the mint arguments."""
    args: dict[str, Any] = {
        "agent": "support-1",
        "principals": ["42", "43"],
        "issuer": ISSUER,
        "task": "T-17",
        "ttl": 900,
        "now": NOW,
    }
    args.update(claims)
    return mint(key, **args)


def raw_token(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A token put together by hand (for headers and payloads no library would sign)."""
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(payload).encode())
    return f"{head}.{body}.{b64(signature)}"


def payload(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "support-1",
        "aud": "guardproxy",
        "jti": "hand-made",
        "iat": int(NOW),
        "exp": int(NOW + 900),
        "principals": ["42"],
    }
    claims.update(overrides)
    return claims


def now() -> float:
    return time.time()
