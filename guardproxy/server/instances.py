"""The instance registry: which guardproxy instance holds which slot, and where it listens.

Several guardproxy instances (replicas behind one Kubernetes Service) share one
upstream database, and a client's cancel request may reach any of them. Each
instance holds a slot in ``guardproxy.proxy_instances`` (1..255, written into
the pid of every backend key it hands out, see cancel.py) with the address
where the others can reach it. An instance that receives a cancel request for
another slot looks the address up and forwards the request there.

* Worker 0 claims the slot before any worker accepts a client: the lowest slot
  that is free or whose heartbeat is older than ``instance_stale_after``, in one
  INSERT ... ON CONFLICT DO UPDATE ... WHERE (two instances starting at once
  cannot both get one slot: the loser's WHERE sees the winner's fresh heartbeat,
  and it tries the next slot). It heartbeats every
  ``instance_heartbeat_interval`` and deletes its row on graceful shutdown.
* The slot lives in a ``SlotCell``: shared memory made before the workers are
  forked, so every worker puts the same slot into its keys.
* Every worker reads the slot -> address map when a cancel names a slot it does
  not know (or knew too long ago), at most once a second, each read bounded.
* The registry is reached through the default pool (the proxy's own server
  connection, the one that reads the catalog), so it costs no connection of its
  own, and every statement is bounded in time.
* Registry unavailable (Postgres down, schema not upgraded, no privilege): the
  proxy serves anyway, with slot 0; cancel requests then work within this
  instance only. One warning says so at start, and worker 0 tries again at
  every heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import re
import secrets
import socket
import time
from typing import Any

from guardproxy.config import Settings, join_address
from guardproxy.pool.pool import Pool
from guardproxy.protocol.errors import GuardError, UpstreamError
from guardproxy.server.cancel import MAX_SLOT, NO_SLOT

log = logging.getLogger("guardproxy.instances")

TABLE = "guardproxy.proxy_instances"
QUERY_TIMEOUT = 5.0  # seconds one registry statement may take
REFRESH_EVERY = 1.0  # at most one read of the address map per second and worker
CLAIM_ATTEMPTS = 8  # a lost race moves on to the next slot; this many races at most
WILDCARDS = ("", "0.0.0.0", "::", "*")


class RegistryError(Exception):
    """The registry could not be read or written; the message says why."""


class SlotCell:
    """This instance's slot, as every worker reads it when it makes a cancel key.

    -1 while worker 0 has not decided yet, 0 for no slot, 1..255 for a slot. With
    several workers it is shared memory made before the fork, so a slot claimed
    (or claimed again) by worker 0 is seen by all of them at once.
    """

    PENDING = -1

    def __init__(self, shared: bool = False) -> None:
        self._shared: Any = (
            multiprocessing.get_context("fork").RawValue("i", self.PENDING) if shared else None
        )
        self._local = self.PENDING

    def get(self) -> int:
        return int(self._shared.value) if self._shared is not None else self._local

    def set(self, slot: int) -> None:
        if self._shared is not None:
            self._shared.value = slot
        else:
            self._local = slot

    @property
    def slot(self) -> int:
        """The slot to put in keys: 0 while undecided or when there is none."""
        return max(self.get(), NO_SLOT)

    async def wait_decided(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.get() == self.PENDING and loop.time() < deadline:
            await asyncio.sleep(0.05)


def _literal(value: str) -> str:
    """A SQL string literal of a value made of safe characters (addresses, owner tokens)."""
    if not re.fullmatch(r"[A-Za-z0-9._:%\[\]/-]*", value):
        raise ValueError(f"{value!r} has characters not allowed in the instance registry")
    return "'" + value + "'"


def claim_sql(address: str, owner: str, stale_after: float, prefer: int = NO_SLOT) -> str:
    """Takes the lowest free or stale slot (``prefer`` first if it is free or stale) and
    returns it; returns nothing when every slot is held by a live instance.

    Two statements in one implicit transaction (a simple Query): a transaction-level
    advisory lock makes concurrent claims take turns, and the upsert's WHERE refuses to
    take a slot whose heartbeat is fresh even without it (a lost race returns nothing).
    """
    stale = f"now() - make_interval(secs => {float(stale_after)!r})"
    return f"""
        SELECT pg_advisory_xact_lock('{TABLE}'::regclass::oid::bigint);
        WITH candidate AS (
            SELECT s.slot FROM generate_series(1, {MAX_SLOT}) AS s(slot)
            LEFT JOIN {TABLE} q ON q.slot = s.slot
            WHERE q.slot IS NULL OR q.heartbeat_at < {stale}
            ORDER BY s.slot = {int(prefer)} DESC, s.slot
            LIMIT 1
        )
        INSERT INTO {TABLE} AS p (slot, address, owner, started_at, heartbeat_at)
        SELECT slot, {_literal(address)}, {_literal(owner)}, now(), now() FROM candidate
        ON CONFLICT (slot) DO UPDATE
            SET address = EXCLUDED.address, owner = EXCLUDED.owner,
                started_at = EXCLUDED.started_at, heartbeat_at = EXCLUDED.heartbeat_at
            WHERE p.heartbeat_at < {stale}
        RETURNING slot"""


def owner_token() -> str:
    """Who holds a slot: host name, process id and a random part (a restart is a new owner)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:63] or "host"
    return f"{host}/{os.getpid()}/{secrets.token_hex(4)}"


def advertised_address(settings: Settings, bound_port: int) -> str:
    """Where other instances send cancel requests for this one (may block on name resolution)."""
    if settings.advertise_address:
        return settings.advertise_address
    host = settings.listen_host
    if host not in WILDCARDS:
        return join_address(host, bound_port)
    name = socket.gethostname()
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except OSError:
        return join_address(name, bound_port)
    addresses = [str(info[4][0]) for info in infos]
    # an IPv4 address that is not loopback first: what a pod's host name resolves to
    addresses.sort(key=lambda a: (a.startswith("127.") or a == "::1", ":" in a))
    return join_address(addresses[0] if addresses else name, bound_port)


def is_loopback_address(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


class InstanceRegistry:
    """This instance's row in guardproxy.proxy_instances, and the others' addresses."""

    def __init__(self, pool: Pool, settings: Settings, cell: SlotCell) -> None:
        self.pool = pool
        self.settings = settings
        self.cell = cell
        self.address = ""  # set before claim()
        self.owner = owner_token()
        self._addresses: dict[int, str] = {}
        self._loaded_at = float("-inf")  # monotonic time of the last successful read
        self._tried_at = float("-inf")  # of the last attempt
        self._refresh: asyncio.Task[None] | None = None
        self._failing = False  # the last heartbeat failed (warned once per outage)

    # ------------------------------------------------------------ statements

    async def _query(self, sql: str) -> list[list[str | None]]:
        """One statement on the default pool's server, bounded; raises RegistryError."""
        try:
            server = await self.pool.acquire()
        except GuardError as exc:
            raise RegistryError(exc.message) from None
        try:
            rows = await asyncio.wait_for(server.query(sql), QUERY_TIMEOUT)
        except UpstreamError as exc:  # answered with an error, or lost: release() sorts it out
            self.pool.release(server)
            raise RegistryError(exc.message) from None
        except (OSError, TimeoutError) as exc:
            self.pool.discard(server)
            raise RegistryError(str(exc) or f"no answer within {QUERY_TIMEOUT:g}s") from None
        except BaseException:
            self.pool.discard(server)
            raise
        self.pool.release(server)
        return rows

    async def _claim(self, prefer: int = NO_SLOT) -> int:
        """Claims a slot; 0 when every slot is held by a live instance. Raises RegistryError."""
        exists = await self._query(f"SELECT to_regclass('{TABLE}') IS NOT NULL")
        if exists != [["t"]]:
            raise RegistryError(
                f"table {TABLE} does not exist: run `guardproxy db upgrade` "
                "(the schema is older than this guardproxy)"
            )
        try:
            sql = claim_sql(self.address, self.owner, self.settings.instance_stale_after, prefer)
        except ValueError as exc:  # e.g. a host name with characters an address cannot have
            raise RegistryError(f"advertise address {self.address!r} unusable: {exc}") from None
        for _ in range(CLAIM_ATTEMPTS):
            rows = await self._query(sql)
            if rows:
                return int(str(rows[0][0]))
            # lost a race for that slot (or none is free): look again with fresh eyes
            if await self._query(
                f"SELECT count(*) < {MAX_SLOT} FROM {TABLE} WHERE heartbeat_at >= "
                f"now() - make_interval(secs => {float(self.settings.instance_stale_after)!r})"
            ) != [["t"]]:
                break
        return NO_SLOT

    async def start(self) -> None:
        """Claims a slot at start and publishes it in the cell; warns once when it cannot."""
        try:
            slot = await self._claim()
        except RegistryError as exc:
            slot = NO_SLOT
            log.warning(
                "instance registry unavailable (%s): guardproxy serves, but a cancel request "
                "for one of its sessions works only when it reaches this instance itself; "
                "retrying every %gs",
                exc,
                self.settings.instance_heartbeat_interval,
            )
        else:
            if slot == NO_SLOT:
                log.warning(
                    "instance registry full: all %d slots are held by live instances; "
                    "cancel requests for this instance's sessions work only when they reach it",
                    MAX_SLOT,
                )
            else:
                log.info(
                    "instance registry: slot %d, cancel requests reach us at %s", slot, self.address
                )
        self.cell.set(slot)

    async def heartbeat(self) -> None:
        """Keeps the slot fresh; claims one (again) when there is none or it was lost."""
        slot = self.cell.slot
        try:
            if slot == NO_SLOT:
                slot = await self._claim()
                if slot != NO_SLOT:
                    self.cell.set(slot)
                    log.info(
                        "instance registry: slot %d claimed, cancel requests reach us at %s",
                        slot,
                        self.address,
                    )
                self._failing = False
                return
            rows = await self._query(
                f"UPDATE {TABLE} SET heartbeat_at = now() "
                f"WHERE slot = {slot} AND owner = {_literal(self.owner)} RETURNING slot"
            )
            if not rows:
                # our row is gone: deleted, or taken over after missed heartbeats
                new = await self._claim(prefer=slot)
                if new == slot:
                    log.warning(
                        "instance registry: slot %d had lost its row; claimed it again", slot
                    )
                else:
                    log.warning(
                        "instance registry: slot %d was taken over by another instance after "
                        "missed heartbeats; now slot %d. Cancel requests for sessions that "
                        "started before this are honoured only when they reach this instance",
                        slot,
                        new,
                    )
                self.cell.set(new)
        except RegistryError as exc:
            if not self._failing and slot != NO_SLOT:
                log.warning(
                    "instance registry heartbeat failed (%s): keeping slot %d, retrying in %gs",
                    exc,
                    slot,
                    self.settings.instance_heartbeat_interval,
                )
            else:
                log.debug("instance registry still unavailable: %s", exc)
            self._failing = True
            return
        if self._failing and slot != NO_SLOT:
            log.info("instance registry heartbeat works again (slot %d)", self.cell.slot)
        self._failing = False

    async def keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self.settings.instance_heartbeat_interval)
            await self.heartbeat()

    async def release(self) -> None:
        """Gives the slot back (graceful shutdown); a failure leaves it to go stale."""
        slot = self.cell.slot
        if slot == NO_SLOT:
            return
        try:
            await self._query(
                f"DELETE FROM {TABLE} WHERE slot = {slot} AND owner = {_literal(self.owner)}"
            )
        except RegistryError as exc:
            log.info("instance registry: slot %d not released (%s); it goes stale", slot, exc)
            return
        log.info("instance registry: slot %d released", slot)

    # ------------------------------------------------------------ lookups

    async def address_of(self, slot: int) -> str | None:
        """The address of the live instance holding ``slot``, or None.

        The map read last is used while it is younger than a heartbeat interval;
        otherwise, or when it lacks the slot, it is read again (at most once a
        second; concurrent lookups share one read).
        """
        fresh = time.monotonic() - self._loaded_at < self.settings.instance_heartbeat_interval
        if not (fresh and slot in self._addresses):
            await self._refreshed()
        return self._addresses.get(slot)

    def forget(self, slot: int) -> None:
        """The address of ``slot`` did not answer: read the map again next time."""
        self._addresses.pop(slot, None)

    async def _refreshed(self) -> None:
        if self._refresh is None or self._refresh.done():
            if time.monotonic() - self._tried_at < REFRESH_EVERY:
                return
            self._tried_at = time.monotonic()
            self._refresh = asyncio.get_running_loop().create_task(self._read_map())
        with contextlib.suppress(Exception):
            await asyncio.shield(self._refresh)

    async def _read_map(self) -> None:
        stale = float(self.settings.instance_stale_after)
        try:
            rows = await self._query(
                f"SELECT slot, address FROM {TABLE} "
                f"WHERE heartbeat_at >= now() - make_interval(secs => {stale!r})"
            )
        except RegistryError as exc:
            log.info("instance registry unreadable, cancel request not routed: %s", exc)
            return
        self._addresses = {int(str(r[0])): str(r[1]) for r in rows}
        self._loaded_at = time.monotonic()
