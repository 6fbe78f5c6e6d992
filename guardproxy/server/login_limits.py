"""Failed-login limits: whether a client may try to log in, from recent failures.

Pure bookkeeping, no I/O: the login code asks `refusal(source, agent_id)` before it
authenticates, and reports `failed(...)` (and, optionally, `succeeded(...)`) after.

The policy (docs/security.md, "Failed logins"):

* A failure counts for the pair (source address, agent id) and for the source address.
* A login is refused when, within the last ``window`` seconds, its pair failed
  ``per_agent`` times, or its source failed ``per_source`` times (for any agent ids:
  one address spraying guesses over many agent ids).
* Nothing is counted per agent id alone, so peers that cannot authenticate never
  lock out an agent (or an admin) that logs in from another address. The price:
  guesses from many addresses are slowed per address, not stopped (see the threat
  model in docs/security.md).
* The answer is the same whichever limit was reached and whether or not the agent
  exists, so it tells an attacker nothing about agent ids.
* A success forgets its pair's failures (a fixed secret works at once), never its
  source's: one valid login cannot reset a source's allowance of guesses.

Memory is bounded: each counted key (pair or source) keeps at most its limit of
timestamps, keys are dropped once their last failure is older than the window, and
at most ``max_keys`` are kept (those with the oldest last failure go first when a
flood from ever new addresses passes that).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

WINDOW = 60.0  # seconds a failure counts
SOURCE_FACTOR = 4  # per_source = SOURCE_FACTOR * per_agent, unless given
MAX_KEYS = 100_000
REFUSAL = "too many failed logins recently; wait a minute before trying again"

# (source, agent id) for a pair, (source, None) for a source
Key = tuple[str, str | None]


class LoginLimits:
    def __init__(
        self,
        per_agent: int,
        per_source: int | None = None,
        *,
        window: float = WINDOW,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_agent < 1:
            raise ValueError("per_agent must be at least 1")
        self.per_agent = per_agent
        self.per_source = max(per_source or SOURCE_FACTOR * per_agent, per_agent)
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        # key -> times of its latest failures (at most its limit), ordered by last failure
        self._failures: OrderedDict[Key, deque[float]] = OrderedDict()

    def refusal(self, source: str, agent_id: str) -> str | None:
        """Why a login of ``agent_id`` from ``source`` must be refused now, or None."""
        now = self._clock()
        if self._reached((source, agent_id), self.per_agent, now) or self._reached(
            (source, None), self.per_source, now
        ):
            return REFUSAL
        return None

    def failed(self, source: str, agent_id: str) -> None:
        """Counts one failed login of ``agent_id`` from ``source``."""
        now = self._clock()
        self._count((source, agent_id), self.per_agent, now)
        self._count((source, None), self.per_source, now)
        self._prune(now)

    def succeeded(self, source: str, agent_id: str) -> None:
        """Forgets the failures of this pair (not of its source)."""
        self._failures.pop((source, agent_id), None)

    def __len__(self) -> int:
        """Keys (pairs and sources) held now."""
        return len(self._failures)

    def _reached(self, key: Key, limit: int, now: float) -> bool:
        times = self._failures.get(key)
        # the oldest of the last `limit` failures within the window: `limit` failures in it
        return times is not None and len(times) >= limit and now - times[0] < self.window

    def _count(self, key: Key, limit: int, now: float) -> None:
        times = self._failures.get(key)
        if times is None:
            times = self._failures[key] = deque(maxlen=limit)
        else:
            self._failures.move_to_end(key)
        times.append(now)

    def _prune(self, now: float) -> None:
        """Drops keys whose last failure left the window, then the oldest beyond max_keys.
        Keys are in order of last failure, so both stop at the first key they keep."""
        failures = self._failures
        while failures:
            key, times = next(iter(failures.items()))
            if now - times[-1] < self.window and len(failures) <= self.max_keys:
                break
            del failures[key]
