"""Group controls shared through the queue file: pause flags and rate limits.

Both live in the ``settings`` table, so every process and every pool working
a group sees the same state, with no daemon to run:

- ``paused:<group>``: present while the group is paused. Workers check it
  before each hand-out and take nothing while it is set.
- ``rate:<group>``: the earliest time (epoch seconds) of the next hand-out
  (the "theoretical arrival time" of a GCRA limiter with no burst).

The rate limit is strict: with ``N`` per window ``W``, hand-outs are spaced at
least ``W / N`` apart across every process, so no window of length ``W`` holds
more than ``N`` of them. A hand-out is *reserved* (the row is pushed far into
the future while the claim runs, so nobody else claims meanwhile), then
*settled* once the claim is done: to ``claim end + W/N`` if something was
handed out, back to its old value if nothing was. A process killed between
the two stalls the group for at most ``GUARD`` seconds.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple

if TYPE_CHECKING:
    from .queue import StaggerQueue

#: Seconds a reservation blocks other claimers if its holder dies mid-claim.
GUARD = 10.0

_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class Rate:
    """At most ``count`` hand-outs in any window of ``window`` seconds."""

    count: float
    window: float

    @property
    def interval(self) -> float:
        """Seconds between two hand-outs."""
        return self.window / self.count

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}.get(self.window, f"{self.window}s")
        return f"{self.count:g}/{unit}"


def parse_rate(text: str) -> Rate:
    """Parse ``"N/s"``, ``"N/m"`` or ``"N/h"``.

    Raises:
        ValueError: anything else, or N not > 0.
    """
    m = _RATE.match(text.lower()) if isinstance(text, str) else None
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"bad rate {text!r}: use N/s, N/m or N/h with N > 0, e.g. 100/s")
    return Rate(float(m.group(1)), _UNITS[m.group(2)])


def _key(kind: str, group: str) -> str:
    return f"{kind}:{group}"


def _get(conn, key: str):
    rows = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchall()
    return rows[0][0] if rows else None


def _put(conn, key: str, value) -> None:
    conn.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value))


# -- pause -----------------------------------------------------------------


def pause(q: "StaggerQueue", group: str) -> None:
    """Pause ``group``: every worker of it stops taking messages (what is in
    hand is finished). Idempotent; survives restarts until ``resume``."""
    q._storage.write(lambda conn: _put(conn, _key("paused", group), time.time()))


def resume(q: "StaggerQueue", group: str) -> None:
    """Let the workers of ``group`` take messages again. Idempotent."""
    q._storage.write(lambda conn: conn.execute("DELETE FROM settings WHERE key = ?", (_key("paused", group),)))


def is_paused(q: "StaggerQueue", group: str) -> bool:
    """True while ``group`` is paused."""
    return q._storage.read(lambda conn: _get(conn, _key("paused", group))) is not None


# -- rate ------------------------------------------------------------------


class RateLimiter:
    """The group-wide limiter, one per worker; state lives in the queue file."""

    def __init__(self, q: "StaggerQueue", group: str, rate: Rate) -> None:
        self._q = q
        self._key = _key("rate", group)
        self.rate = rate

    def reserve(self) -> Tuple[Optional[float], float]:
        """Try to take the next hand-out: ``(token, wait)``.

        ``token`` (the row's old value, for ``settle``) is None when the next
        hand-out is not due yet; ``wait`` is then the seconds until it is.
        """

        def take(conn) -> Tuple[Optional[float], float]:
            t = time.time()
            due = _get(conn, self._key)
            due = 0.0 if due is None else float(due)
            if t < due:
                return None, due - t
            _put(conn, self._key, t + GUARD)
            return due, 0.0

        if self.wait_hint() > 0:  # a read first: waiting members cost writers nothing
            return None, self.wait_hint()
        return self._q._storage.write(take, notify=False)

    def settle(self, token: float, handed_out: bool) -> None:
        """End a reservation: the next hand-out is due ``interval`` from now,
        or, if nothing was handed out, when it was due before."""

        def done(conn) -> None:
            _put(conn, self._key, time.time() + self.rate.interval if handed_out else token)

        self._q._storage.write(done, notify=False)

    def wait_hint(self) -> float:
        """Seconds until the next hand-out may be due (0 if now)."""
        due = self._q._storage.read(lambda conn: _get(conn, self._key))
        return 0.0 if due is None else max(0.0, float(due) - time.time())
