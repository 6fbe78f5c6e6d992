"""Token revocations: stored in ``guardproxy.token_revocations``, honoured by every instance.

Two kinds, each optionally limited to one issuer (``issuer = ''``: every issuer):

* ``token``: the token whose ``jti`` is `value` is refused from now on;
* ``principal``: every token acting for principal `value` *issued before* the
  revocation (``iat <= revoked_at + clock skew``) is refused; tokens minted later work,
  so revoking a principal cuts off the agents already running for that person without
  locking the person out for good. Revoking again moves the cut-off to now.

`RevocationStore` reads and writes the table with asyncpg (its own connection, like
the audit writer); each change also sends ``NOTIFY guardproxy_token_revocations``.
`RevocationCache` keeps an immutable `RevocationSet` in memory, re-read every
``delegation_revocations_refresh`` seconds and as soon as a notification arrives, so
a revocation reaches every instance within seconds. Checking a token is a few dict
lookups, no I/O. When the list could not be read for ``stale_after`` seconds (or
never was), `revoked()` raises `RevocationsUnavailable`: delegated statements are
refused rather than run against a list that may be missing a revocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from .claims import Delegation, when
from .errors import RevocationsUnavailable

log = logging.getLogger("guardproxy.delegation")

TABLE = "guardproxy.token_revocations"
CHANNEL = "guardproxy_token_revocations"
KINDS = ("token", "principal")
QUERY_TIMEOUT = 5.0


@dataclass(frozen=True)
class Revocation:
    kind: str  # token or principal
    value: str  # the jti, or the principal
    issuer: str  # '' for every issuer
    revoked_at: float  # seconds since the epoch
    revoked_by: str
    reason: str | None = None

    def describe(self) -> str:
        what = f"token {self.value}" if self.kind == "token" else f"principal {self.value}"
        issuer = f" of issuer {self.issuer}" if self.issuer else ""
        reason = f" ({self.reason})" if self.reason else ""
        return f"{what}{issuer} revoked by {self.revoked_by} at {when(self.revoked_at)}{reason}"

    def row(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "value": self.value,
            "issuer": self.issuer or "*",
            "revoked_at": when(self.revoked_at),
            "revoked_by": self.revoked_by,
            "reason": self.reason or "",
        }


class RevocationSet:
    """An immutable snapshot of the revocations, indexed for the per-statement check."""

    def __init__(self, revocations: Iterable[Revocation] = (), clock_skew: float = 30.0) -> None:
        self.revocations = tuple(revocations)
        self.clock_skew = clock_skew
        self._tokens: dict[str, list[Revocation]] = {}
        self._principals: dict[str, list[Revocation]] = {}
        for r in self.revocations:
            index = self._tokens if r.kind == "token" else self._principals
            index.setdefault(r.value, []).append(r)

    def __len__(self) -> int:
        return len(self.revocations)

    def match(self, delegation: Delegation) -> Revocation | None:
        """The revocation that applies to this token, or None."""
        for r in self._tokens.get(delegation.token_id, ()):
            if r.issuer in ("", delegation.issuer):
                return r
        if not self._principals:
            return None
        for principal in self._principals.keys() & set(delegation.principals):
            for r in self._principals[principal]:
                if (
                    r.issuer in ("", delegation.issuer)
                    and delegation.issued_at <= r.revoked_at + self.clock_skew
                ):
                    return r
        return None


def _revocation(row: Any) -> Revocation:
    at: datetime = row["revoked_at"]
    return Revocation(
        kind=row["kind"],
        value=row["value"],
        issuer=row["issuer"],
        revoked_at=at.timestamp(),
        revoked_by=row["revoked_by"],
        reason=row["reason"],
    )


class RevocationStore:
    """Reads and writes ``guardproxy.token_revocations`` (asyncpg, one connection, one
    operation at a time: the cache and the admin console may share a store)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()

    async def connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.dsn, timeout=QUERY_TIMEOUT)
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                # bounded: after a cancelled query the server may never answer the goodbye
                await self._conn.close(timeout=QUERY_TIMEOUT)
            self._conn = None

    async def revoke(
        self, kind: str, value: str, *, by: str, issuer: str = "", reason: str | None = None
    ) -> Revocation:
        """Records a revocation (again: its cut-off moves to now) and notifies every instance."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        if not value or any("\x00" in v for v in (value, issuer, by, reason or "")):
            raise ValueError("a revocation needs a token id or a principal (no NUL characters)")
        async with self._lock:
            conn = await self.connection()
            async with conn.transaction():
                row = await conn.fetchrow(
                    f"INSERT INTO {TABLE} (kind, value, issuer, revoked_by, reason) "
                    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (kind, value, issuer) DO UPDATE "
                    "SET revoked_at = now(), revoked_by = EXCLUDED.revoked_by, "
                    "reason = EXCLUDED.reason RETURNING *",
                    kind,
                    value,
                    issuer,
                    by,
                    reason,
                    timeout=QUERY_TIMEOUT,
                )
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, kind, timeout=QUERY_TIMEOUT)
        assert row is not None
        return _revocation(row)

    async def unrevoke(self, kind: str, value: str, issuer: str = "") -> bool:
        """Removes a revocation; True if there was one."""
        async with self._lock:
            conn = await self.connection()
            async with conn.transaction():
                status = await conn.execute(
                    f"DELETE FROM {TABLE} WHERE kind = $1 AND value = $2 AND issuer = $3",
                    kind,
                    value,
                    issuer,
                    timeout=QUERY_TIMEOUT,
                )
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, kind, timeout=QUERY_TIMEOUT)
        return str(status).endswith(" 1")

    async def list(self) -> list[Revocation]:
        async with self._lock:
            conn = await self.connection()
            rows = await conn.fetch(
                f"SELECT * FROM {TABLE} ORDER BY revoked_at DESC, id DESC", timeout=QUERY_TIMEOUT
            )
        return [_revocation(r) for r in rows]

    async def listen(self, callback: Any) -> asyncpg.Connection:
        """Calls `callback` on every change notification, on the store's connection."""
        async with self._lock:
            conn = await self.connection()
            await conn.add_listener(CHANNEL, callback)
        return conn


class RevocationCache:
    """The revocation list in memory, kept fresh (see the module docstring)."""

    def __init__(
        self,
        store: RevocationStore,
        refresh: float = 5.0,
        clock_skew: float = 30.0,
        stale_after: float | None = None,
    ) -> None:
        self.store = store
        self.refresh = refresh
        self.clock_skew = clock_skew
        self.stale_after = stale_after if stale_after is not None else max(30.0, 6 * refresh)
        self.current = RevocationSet((), clock_skew)
        self.loaded_at: float | None = None  # time.time() of the last successful read
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listening: asyncpg.Connection | None = None
        self._failing = False

    def revoked(self, delegation: Delegation, now: float) -> Revocation | None:
        if self.loaded_at is None or now - self.loaded_at > self.stale_after:
            since = (
                "never been read"
                if self.loaded_at is None
                else f"not been read since {when(self.loaded_at)}"
            )
            raise RevocationsUnavailable(
                f"the token revocation list has {since}: statements of delegated sessions are "
                "refused until it can be read again (fail closed)",
                hint="the operator should check that guardproxy reaches its database "
                f"and that {TABLE} exists (guardproxy db upgrade)",
            )
        return self.current.match(delegation)

    async def load(self) -> bool:
        """Reads the list now; False (and one warning per failure streak) if it cannot."""
        try:
            revocations = await self.store.list()
            await self._listen()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            if not self._failing:
                log.warning("cannot read the token revocation list: %s", exc)
            self._failing = True
            await self.store.close()
            self._listening = None
            return False
        if self._failing:
            log.info("token revocation list readable again (%d revocations)", len(revocations))
        self._failing = False
        self.current = RevocationSet(revocations, self.clock_skew)
        self.loaded_at = time.time()
        return True

    async def _listen(self) -> None:
        if self._listening is None or self._listening.is_closed():
            self._listening = await self.store.listen(self._notified)

    def _notified(self, *_args: object) -> None:
        self._wake.set()

    async def start(self) -> None:
        """Reads the list once, then keeps it fresh in a background task."""
        await self.load()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancel that
            # comes as a notification sets the event, and close() would wait forever
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.refresh):
                    await self._wake.wait()
            self._wake.clear()
            await self.load()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # waits for the task without taking its CancelledError for the caller's own
            await asyncio.wait({task})
        await self.store.close()
