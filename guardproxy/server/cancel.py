"""Cancel keys: which instance and which worker own a session, written into its pid.

A client cancels a query by opening a new connection and sending the pid and
secret of its BackendKeyData. That connection may reach any worker of any
guardproxy instance, so the pid says where the session lives::

    bit 31      0          the pid stays a positive int32
    bits 30-23  slot       the instance's slot in guardproxy.proxy_instances, 1..255;
                           0 when the instance holds no slot (registry unavailable)
    bits 22-17  worker     the worker process inside the instance, 0..63
    bits 16-0   random     never all zero when slot and worker are, so the pid is never 0

The secret is 31 random bits, as before: it is what makes a cancel request
authentic; the pid only says where to look.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from guardproxy.config import parse_address
from guardproxy.protocol import codec

log = logging.getLogger("guardproxy.cancel")

SLOT_BITS = 8
WORKER_BITS = 6
RANDOM_BITS = 31 - SLOT_BITS - WORKER_BITS  # 17
MAX_SLOT = (1 << SLOT_BITS) - 1  # 255 instances sharing one registry
MAX_WORKERS = 1 << WORKER_BITS  # 64 workers per instance (Settings.workers allows 64)
NO_SLOT = 0
_WORKER_SHIFT = RANDOM_BITS
_SLOT_SHIFT = RANDOM_BITS + WORKER_BITS


def new_cancel_key(slot: int, worker: int) -> tuple[int, int]:
    """A fresh (pid, secret) for a session of ``worker`` in the instance holding ``slot``."""
    if not 0 <= slot <= MAX_SLOT:
        raise ValueError(f"instance slot {slot} is outside 0..{MAX_SLOT}")
    if not 0 <= worker < MAX_WORKERS:
        raise ValueError(f"worker {worker} is outside 0..{MAX_WORKERS - 1}")
    random_part = secrets.randbelow((1 << RANDOM_BITS) - 1) + 1  # 1 .. 2**17 - 1
    pid = (slot << _SLOT_SHIFT) | (worker << _WORKER_SHIFT) | random_part
    return pid, secrets.randbits(31)


def slot_of(pid: int) -> int:
    """The instance slot of a pid (0: no slot); garbage in a client's pid gives some slot."""
    return (pid >> _SLOT_SHIFT) & MAX_SLOT


def worker_of(pid: int) -> int:
    return (pid >> _WORKER_SHIFT) & (MAX_WORKERS - 1)


async def send_cancel(address: str, pid: int, secret: int, code: int, timeout: float) -> bool:
    """Sends one cancel packet to ``address`` (host:port) and closes; True once it was written.

    Nothing is answered to a cancel request, so written is all that can be known.
    """
    try:
        host, port = parse_address(address)
    except ValueError as exc:
        log.warning("instance address %r in the registry is unusable: %s", address, exc)
        return False
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        log.info("cannot forward a cancel request to %s: %s", address, exc or "timed out")
        return False
    try:
        writer.write(codec.build_cancel(pid, secret, code))
        await asyncio.wait_for(writer.drain(), timeout)
    except (OSError, TimeoutError) as exc:
        log.info("cannot forward a cancel request to %s: %s", address, exc or "timed out")
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), timeout)
    return True
