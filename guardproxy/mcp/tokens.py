"""Bearer tokens of the MCP HTTP endpoint: a tokens file, like the auth file, and its verifier.

File format, one token per line (an agent may have several, to rotate them)::

    agent-id:sha256:<hex SHA-256 of the token>

Only the hash is stored; the token itself is printed once by `new_token` (``guardproxy
mcp token AGENT``). Tokens are 256 random bits, so an unsalted hash is safe to keep.
Lines starting with ``#`` are comments. The file is read again when it changes, so
adding or removing a token needs no restart.

`TokenFileVerifier` is the SDK's `TokenVerifier` for it: a known token gives an
`AccessToken` whose ``client_id`` is the agent id. `AnyOf` tries several verifiers
in turn: the tokens file, then delegation tokens (`delegation.DelegationBearer`,
whose accepted tokens the gateway presents to the proxy on every call).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from mcp.server.auth.provider import AccessToken, TokenVerifier

from ..protocol.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "gpmcp_"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: Path) -> dict[str, str]:
    """hash -> agent id; raises ConfigError naming the line that is wrong."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(
            f"tokens file {path}: cannot read it ({exc.strerror}); create it with "
            "`guardproxy mcp token AGENT --tokens-file FILE`"
        ) from None
    tokens: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        agent, sep, rest = line.partition(":")
        kind, sep2, digest = rest.partition(":")
        if not (agent and sep and sep2 and kind == "sha256") or len(digest) != 64:
            raise ConfigError(
                f"tokens file {path}, line {number}: expected 'agent-id:sha256:<64 hex digits>'"
            )
        try:
            bytes.fromhex(digest)
        except ValueError:
            raise ConfigError(f"tokens file {path}, line {number}: the hash is not hex") from None
        tokens[digest.lower()] = agent
    return tokens


def new_token(path: Path, agent: str) -> str:
    """Add a new token of `agent` to the file (created 0600); returns the token."""
    if not agent or ":" in agent or any(ch.isspace() for ch in agent):
        raise ConfigError("agent id must be non-empty, without ':' or whitespace")
    token = PREFIX + secrets.token_urlsafe(32)
    lines = path.read_text().splitlines() if path.exists() else []
    lines.append(f"{agent}:sha256:{token_hash(token)}")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return token


class TokenFileVerifier(TokenVerifier):
    """Agent tokens from a tokens file (re-read when its modification time changes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = self._stat()
        self._tokens = load_tokens(path)  # ConfigError when missing or malformed

    def _stat(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def _reload(self) -> None:
        stamp = self._stat()
        if stamp is not None and stamp != self._stamp:
            self._stamp = stamp  # a broken file is reported once, not on every request
            self._tokens = load_tokens(self.path)

    def agents(self) -> set[str]:
        return set(self._tokens.values())

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            self._reload()
        except ConfigError as exc:
            # keep the tokens read last: a half-written edit must not lock everyone out
            log.warning("%s; keeping the tokens read before", exc)
        digest = token_hash(token)
        agent = self._tokens.get(digest)
        if agent is None:
            return None
        # the token field keeps the hash: the plaintext is not carried further
        return AccessToken(token=digest, client_id=agent, scopes=[])


class AnyOf(TokenVerifier):
    """The first verifier that knows the token wins."""

    def __init__(self, verifiers: Sequence[TokenVerifier]) -> None:
        self.verifiers = list(verifiers)

    async def verify_token(self, token: str) -> AccessToken | None:
        for verifier in self.verifiers:
            found = await verifier.verify_token(token)
            if found is not None:
                return found
        return None
