"""Verification of delegation tokens (guardproxy/delegation/verify.py, keys.py, claims.py)
against tokens and keys the tests make: every bad input of issue 16 gets a TokenError
(SQLSTATE 28000) that says what was wrong, and never quotes the token."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from pathlib import Path

import pytest
from _tokens import (
    ISSUER,
    NOW,
    b64,
    issuer,
    key_pair,
    payload,
    private_key,
    public_pem,
    raw_token,
    token,
    verifier,
)
from cryptography.hazmat.primitives.asymmetric import rsa

from guardproxy.analysis.model import Op, StatementClass
from guardproxy.config import DelegationIssuer
from guardproxy.delegation.claims import when
from guardproxy.delegation.errors import RevocationsUnavailable, TokenError
from guardproxy.delegation.mint import SigningKey
from guardproxy.delegation.revocations import (
    Revocation,
    RevocationCache,
    RevocationSet,
    RevocationStore,
)
from guardproxy.delegation.verify import Verifier

ALGORITHMS = ["EdDSA", "ES256", "RS256", "HS256"]


def refused(v: Verifier, text: str, kind: str, agent: str = "support-1", now: float = NOW) -> str:
    """Asserts the token is refused with `kind`; returns the message (checked for leaks)."""
    with pytest.raises(TokenError) as caught:
        v.verify(text, agent, now)
    error = caught.value
    assert (error.kind, error.sqlstate) == (kind, "28000"), error.message
    for part in text.split("."):
        if len(part) > 8:  # no part of the token (a bearer secret) is ever quoted
            assert part not in error.message and part not in (error.hint or "")
    return error.message


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_a_good_token_of_each_algorithm_gives_its_delegation(alg: str, tmp_path: Path) -> None:
    key, path = key_pair(alg, tmp_path)
    text = token(key, token_id="run-1", narrow={"tables": {"orders": ["select"]}})
    d = verifier(path).verify(text, "support-1", NOW + 60)
    assert (d.agent_id, d.subject, d.issuer, d.token_id) == (
        "support-1",
        "support-1",
        ISSUER,
        "run-1",
    )
    assert d.principals == ("42", "43") and d.task == "T-17"
    assert (d.issued_at, d.expires_at) == (NOW, NOW + 900)
    assert d.narrowing is not None and d.narrowing.tables is not None
    assert [(t.key, t.ops) for t in d.narrowing.tables] == [("orders", frozenset({Op.SELECT}))]
    assert d.fingerprint == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert text not in d.describe() and "run-1" in d.describe()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not a token",
        "a.b",
        "a.b.c.d",
        "abc.def.ghi",
        b64(b"{not json") + "." + b64(b"{}") + ".",
        b64(json.dumps({"typ": "JWT"}).encode()) + "." + b64(b"{}") + ".",  # no alg
        "eyJ" + "A" * 20_000 + ".e.e",
    ],
)
def test_malformed_tokens_are_refused(text: str, tmp_path: Path) -> None:
    _, path = key_pair("EdDSA", tmp_path)
    message = refused(verifier(path), text, "malformed")
    assert "not a delegation token" in message


def test_a_payload_that_is_not_json_is_malformed(tmp_path: Path) -> None:
    key, path = key_pair("HS256", tmp_path)
    head = b64(json.dumps({"alg": "HS256"}).encode())
    body = b64(b"[1, 2")
    signature = hmac.new(key.key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    refused(verifier(path), f"{head}.{body}.{b64(signature)}", "malformed")


def test_an_expired_token_is_refused_with_its_expiry(tmp_path: Path) -> None:
    key, path = key_pair("ES256", tmp_path)
    text = token(key, token_id="old-run")
    v = verifier(path)
    v.verify(text, "support-1", NOW + 900 + 29)  # within the 30 s clock skew
    message = refused(v, text, "expired", now=NOW + 900 + 31)
    assert f"expired at {when(NOW + 900)}" in message and "old-run" in message
    with pytest.raises(TokenError) as caught:
        v.verify(text, "support-1", NOW + 2000)
    assert "SET guard.token" in (caught.value.hint or "")


def test_future_dated_tokens_are_refused(tmp_path: Path) -> None:
    key, path = key_pair("EdDSA", tmp_path)
    v = verifier(path)
    issued_later = token(key, now=NOW + 120)
    message = refused(v, issued_later, "not_yet_valid")
    assert when(NOW + 120) in message and "(iat)" in message
    v.verify(issued_later, "support-1", NOW + 100)  # within the skew of its iat
    head = {"alg": "HS256"}
    hkey, hpath = key_pair("HS256", tmp_path)
    body = payload(nbf=int(NOW + 300))
    signing_input = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(body).encode())}"
    signature = hmac.new(hkey.key, signing_input.encode(), hashlib.sha256).digest()
    assert "(nbf)" in refused(verifier(hpath), f"{signing_input}.{b64(signature)}", "not_yet_valid")


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_a_token_signed_with_another_key_is_refused(alg: str, tmp_path: Path) -> None:
    _, path = key_pair(alg, tmp_path, "trusted")
    other, _ = key_pair(alg, tmp_path, "attacker")
    if alg == "HS256":
        other = SigningKey("HS256", b"another-secret-" + b"y" * 40)
    assert "does not verify" in refused(verifier(path), token(other), "signature")


def test_a_token_altered_after_signing_is_refused(tmp_path: Path) -> None:
    key, path = key_pair("EdDSA", tmp_path)
    head, _, signature = token(key).split(".")
    forged = b64(json.dumps(payload(principals=["42", "43", "99"])).encode())
    refused(verifier(path), f"{head}.{forged}.{signature}", "signature")


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(alg: str, tmp_path: Path) -> None:
    _, path = key_pair("HS256", tmp_path)
    message = refused(verifier(path), raw_token({"alg": alg}, payload()), "algorithm")
    assert "'none'" in message


def test_unknown_algorithms_are_refused_before_any_key_is_used(tmp_path: Path) -> None:
    _, path = key_pair("HS256", tmp_path)
    for alg in ("HS512", "PS256", "ES384", "RS1"):
        refused(verifier(path), raw_token({"alg": alg}, payload(), b"x" * 32), "algorithm")


def test_an_rsa_public_key_cannot_be_used_as_an_hmac_secret(tmp_path: Path) -> None:
    """Algorithm confusion: an attacker who knows the issuer's RSA public key signs an
    HS256 token with the PEM text as the secret. The key verifies RS256 only."""
    _, path = key_pair("RS256", tmp_path)
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(payload(principals=["1", "2", "3"])).encode())
    signature = hmac.new(path.read_bytes(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    message = refused(verifier(path), f"{head}.{body}.{b64(signature)}", "signature")
    assert "has no such key" in message


def test_an_issuer_restricted_to_one_algorithm_refuses_others(tmp_path: Path) -> None:
    key, path = key_pair("HS256", tmp_path)
    v = verifier(path, algorithms=["EdDSA"])
    assert "uses EdDSA" in refused(v, token(key), "algorithm")


def test_wrong_audience_is_refused(tmp_path: Path) -> None:
    key, path = key_pair("EdDSA", tmp_path)
    v = verifier(path, audiences=["guardproxy-prod"])
    assert "guardproxy-prod" in refused(v, token(key, audience="billing-api"), "audience")
    v.verify(token(key, audience="guardproxy-prod"), "support-1", NOW)


def test_a_token_for_another_agent_is_refused(tmp_path: Path) -> None:
    key, path = key_pair("EdDSA", tmp_path)
    v = verifier(path)
    message = refused(v, token(key, agent="support-1"), "agent", agent="support-2")
    assert "'support-1'" in message and "'support-2'" in message
    wildcard = token(key, agent="support-*")
    assert v.verify(wildcard, "support-7", NOW).agent_id == "support-7"
    refused(v, wildcard, "agent", agent="analytics-1")


def test_an_untrusted_issuer_is_refused(tmp_path: Path) -> None:
    key, path = key_pair("EdDSA", tmp_path)
    message = refused(verifier(path), token(key, issuer="evil-app"), "issuer")
    assert "'evil-app'" in message and ISSUER in message


def test_a_token_living_longer_than_max_ttl_is_refused(tmp_path: Path) -> None:
    key, path = key_pair("EdDSA", tmp_path)
    v = verifier(path, max_ttl=600)
    assert "at most 600s" in refused(v, token(key, ttl=3600), "lifetime")


def test_an_unreadable_key_file_refuses_tokens_of_that_issuer_only(tmp_path: Path) -> None:
    key, path = key_pair("EdDSA", tmp_path)
    good = DelegationIssuer.model_validate({"issuer": "other-app", "key_file": str(path)})
    missing = issuer(tmp_path / "no-such-file.pub")
    v = Verifier([missing, good])
    message = refused(v, token(key), "keys")
    assert "no-such-file.pub" in message
    assert v.verify(token(key, issuer="other-app"), "support-1", NOW).issuer == "other-app"
    assert len(v.key_problems()) == 1
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    assert "not a PEM key" in refused(verifier(garbage), token(key), "keys")
    short = tmp_path / "short.secret"
    short.write_text("too-short\n")
    assert "at least 32" in refused(verifier(short), token(key), "keys")
    ssh = tmp_path / "ssh.pub"
    ssh.write_text(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n"
    )
    assert "not usable as an HMAC secret" in refused(verifier(ssh), token(key), "keys")


def test_a_jwks_with_no_usable_key_is_refused_saying_why(tmp_path: Path) -> None:
    key, _ = key_pair("EdDSA", tmp_path)
    weak = rsa_jwk(1024, "weak")
    jwks = {
        "keys": [
            {**weak, "use": "enc", "kid": "enc-key"},
            weak,
            {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"},
            {"kty": "RSA", "kid": "hs", "alg": "HS512"},
        ]
    }
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    message = refused(verifier(path, jwks=True), token(key), "keys")
    assert "no usable key" in message
    for why in ("enc-key: use is 'enc'", "weak: RSA key of 1024 bits", "hs: alg 'HS512'"):
        assert why in message
    path.write_text('{"keys": []}')
    assert "lists no keys" in refused(verifier(path, jwks=True), token(key), "keys")
    path.write_text("not json")
    assert "not JSON" in refused(verifier(path, jwks=True), token(key), "keys")


def rsa_jwk(bits: int, kid: str) -> dict[str, str]:
    numbers = rsa.generate_private_key(65537, bits).public_key().public_numbers()

    def n64(n: int) -> str:
        return b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))

    return {"kty": "RSA", "kid": kid, "n": n64(numbers.n), "e": n64(numbers.e)}


def test_jwks_keys_are_chosen_by_kid(tmp_path: Path) -> None:
    from jwt.algorithms import ECAlgorithm, OKPAlgorithm

    first, second = private_key("EdDSA"), private_key("ES256")
    jwks = {
        "keys": [
            {**json.loads(OKPAlgorithm.to_jwk(first.public_key())), "kid": "k1"},
            {**json.loads(ECAlgorithm.to_jwk(second.public_key())), "kid": "k2", "use": "sig"},
        ]
    }
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    v = verifier(path, jwks=True)
    assert v.verify(token(SigningKey("EdDSA", first, "k1")), "support-1", NOW).token_id
    assert v.verify(token(SigningKey("ES256", second, "k2")), "support-1", NOW).token_id
    assert v.verify(token(SigningKey("EdDSA", first)), "support-1", NOW).token_id  # no kid
    message = refused(v, token(SigningKey("EdDSA", first, "k9")), "signature")
    assert "kid 'k9'" in message
    # k2's key with k1's kid: the kid picks the Ed25519 key, the signature fails
    refused(v, token(SigningKey("EdDSA", private_key("EdDSA"), "k1")), "signature")


def test_keys_are_re_read_when_the_file_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = private_key("EdDSA")
    path = tmp_path / "issuer.pub"
    path.write_bytes(public_pem(first))
    v = verifier(path)
    old = token(SigningKey("EdDSA", first))
    v.verify(old, "support-1", NOW)
    second = private_key("ES256")
    replacement = tmp_path / "issuer.pub.new"
    replacement.write_bytes(public_pem(second))
    replacement.replace(path)  # as certificate rotation does: a new file in place
    v.verify(token(SigningKey("ES256", second)), "support-1", NOW)
    refused(v, old, "signature")
    caplog.set_level(logging.INFO, "guardproxy.delegation")
    path.write_text("-----BEGIN PUBLIC KEY-----\nbroken\n-----END PUBLIC KEY-----\n")
    v.verify(token(SigningKey("ES256", second)), "support-1", NOW)  # the last good keys
    v.verify(token(SigningKey("ES256", second)), "support-1", NOW)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "keys read before stay in use" in warnings[0].getMessage()


@pytest.mark.parametrize(
    ("claims", "claim"),
    [
        ({"principals": ["4,2"]}, "principals"),
        ({"principals": "42"}, "principals"),
        ({"principals": [True]}, "principals"),
        ({"principals": [""]}, "principals"),
        ({"principals": ["x\n"]}, "principals"),
        ({"principals": ["1"] * 1001}, "principals"),
        ({"task": 17}, "task"),
        ({"aud": []}, "aud"),
        ({"exp": "tomorrow"}, "exp"),
        ({"iat": True}, "iat"),
        ({"jti": None}, "jti"),
        ({"sub": ""}, "sub"),
        ({"narrow": {"tables": ["orders"], "columns": ["id"]}}, "narrow.columns"),
        ({"narrow": {"tables": {"orders": ["select", "drop"]}}}, "narrow.tables.orders"),
        ({"narrow": {"tables": ["orders; drop table x"]}}, "narrow.tables"),
        ({"narrow": {"statements": ["read", "everything"]}}, "narrow.statements"),
        ({"narrow": []}, "narrow"),
    ],
)
def test_claims_of_the_wrong_shape_are_refused(
    claims: dict[str, object], claim: str, tmp_path: Path
) -> None:
    key, path = key_pair("HS256", tmp_path)
    body = payload(**claims)
    if claims.get("jti", "") is None:
        del body["jti"]
    head = b64(json.dumps({"alg": "HS256"}).encode())
    signing_input = f"{head}.{b64(json.dumps(body).encode())}"
    signature = hmac.new(key.key, signing_input.encode(), hashlib.sha256).digest()
    message = refused(verifier(path), f"{signing_input}.{b64(signature)}", "malformed")
    assert claim in message


def test_integer_principals_and_narrowing_shapes_are_read(tmp_path: Path) -> None:
    key, path = key_pair("EdDSA", tmp_path)
    text = token(
        key,
        principals=[42, "a-7", 42],
        narrow={"tables": ["orders", "sales.Items"], "statements": ["read"]},
    )
    d = verifier(path).verify(text, "support-1", NOW)
    assert d.principals == ("42", "a-7")
    assert d.narrowing is not None and d.narrowing.tables is not None
    assert [(t.schema, t.name, t.ops) for t in d.narrowing.tables] == [
        (None, "orders", None),
        ("sales", "items", None),
    ]
    assert d.narrowing.statements == frozenset({StatementClass.READ})


def test_check_refuses_a_token_once_it_expired(tmp_path: Path) -> None:
    key, path = key_pair("EdDSA", tmp_path)
    v = verifier(path)
    d = v.verify(token(key), "support-1", NOW)
    v.check(d, NOW + 900)
    with pytest.raises(TokenError) as caught:
        v.check(d, NOW + 1000)
    assert caught.value.kind == "expired" and when(NOW + 900) in caught.value.message


def cache_with(*revocations: Revocation, loaded_at: float = NOW) -> RevocationCache:
    cache = RevocationCache(RevocationStore("postgresql://unused"), refresh=5.0)
    cache.current = RevocationSet(revocations, clock_skew=30.0)
    cache.loaded_at = loaded_at
    return cache


def test_revoked_tokens_and_principals_are_refused(tmp_path: Path) -> None:
    key, path = key_pair("EdDSA", tmp_path)
    by_jti = Revocation("token", "run-1", "", NOW - 5, "admin", "leaked in a log")
    v = Verifier([issuer(path)], 30.0, cache_with(by_jti))
    message = refused(v, token(key, token_id="run-1"), "revoked")
    assert "leaked in a log" in message
    v.verify(token(key, token_id="run-2"), "support-1", NOW)
    by_principal = Revocation("principal", "43", "", NOW + 100, "admin")
    v = Verifier([issuer(path)], 30.0, cache_with(by_principal, loaded_at=NOW + 200))
    refused(v, token(key), "revoked", now=NOW + 200)  # issued before the revocation
    later = token(key, now=NOW + 200)  # minted after it: fine
    assert v.verify(later, "support-1", NOW + 200).principals == ("42", "43")
    other_issuer = Revocation("principal", "43", "another-app", NOW + 100, "admin")
    v = Verifier([issuer(path)], 30.0, cache_with(other_issuer, loaded_at=NOW + 200))
    v.verify(token(key), "support-1", NOW + 200)


def test_a_stale_revocation_list_refuses_delegated_statements(tmp_path: Path) -> None:
    key, path = key_pair("EdDSA", tmp_path)
    cache = cache_with(loaded_at=NOW)
    v = Verifier([issuer(path)], 30.0, cache)
    d = v.verify(token(key), "support-1", NOW)
    with pytest.raises(RevocationsUnavailable) as caught:
        v.check(d, NOW + cache.stale_after + 1)
    assert caught.value.sqlstate == "57P03" and "fail closed" in caught.value.message
    cache.loaded_at = None
    with pytest.raises(RevocationsUnavailable, match="never been read"):
        v.check(d, NOW)
