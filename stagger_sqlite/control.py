"""Group controls shared through the queue file: pause flags and rate limits.

Both live in the ``settings`` table, so every process and every pool working
a group sees the same state, with no daemon to run:

- ``paused:<group>``: present while the group is paused
  (``StaggerQueue.pause``). Every claim reads it in its own transaction
  (``groups.GroupConsumer``) and hands out nothing while it is set.
- ``rate:<group>``: the earliest time (epoch seconds) of the next hand-out
  (the "theoretical arrival time" of a GCRA limiter).

The rate limit is strict (see ``RateLimiter``) and is applied inside the
claim's own write transaction, so it holds across every process.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Optional, Tuple

_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class Rate:
    """At most ``count`` hand-outs in any window of ``window`` seconds."""

    count: int
    window: float

    @property
    def interval(self) -> float:
        """Seconds between two hand-outs."""
        return self.window / self.count

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}.get(self.window, f"{self.window}s")
        return f"{self.count}/{unit}"


def parse_rate(text: str) -> Rate:
    """Parse ``"N/s"``, ``"N/m"`` or ``"N/h"`` (N a whole number).

    Raises:
        ValueError: anything else, or N not > 0.
    """
    m = _RATE.match(text.lower()) if isinstance(text, str) else None
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"bad rate {text!r}: use N/s, N/m or N/h with a whole N > 0, e.g. 100/s")
    return Rate(int(m.group(1)), _UNITS[m.group(2)])


def key(kind: str, group: str) -> str:
    """The ``settings`` key of ``kind`` (``"paused"``, ``"rate"``) for ``group``."""
    return f"{kind}:{group}"


def get(conn, key: str):
    """The ``settings`` value of ``key``, or None."""
    rows = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchall()
    return rows[0][0] if rows else None


def put(conn, key: str, value) -> None:
    conn.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value))


# -- rate ------------------------------------------------------------------


#: The limiter spaces hand-outs this much wider than ``window / N``. A
#: hand-out is counted when its claim's transaction begins, and the handler
#: starts a little later (the commit, in full mode an fsync, the way back to
#: the worker), a delay that varies: with hand-outs spaced exactly
#: ``window / N``, a handler could start N + 1 times in some window. 2% of
#: the window (20 ms a second) covers that delay on a loaded machine.
MARGIN = 0.02


class RateLimiter:
    """The group-wide limiter. Its state is one row in the queue file, read
    and updated inside each claim's write transaction (``GroupConsumer``'s
    ``claim_limit`` hook), so every process and every pool shares it.

    A GCRA without burst beyond N: ``due`` (the row) is the earliest time of
    the next hand-out, and ``spacing`` is ``window / N`` widened by
    ``MARGIN``. A claim of ``k`` messages at time ``t`` is allowed when
    ``t >= due + (k - 1) * spacing`` and ``k <= N``; it moves ``due`` to
    ``t + k * spacing``. Then any ``m`` hand-outs span at least
    ``(m - 1) * spacing`` seconds, so no window of ``window`` seconds holds
    more than N of them, even seen a little later by the handlers.

    The limit is on hand-outs, that is claims: a member that claims several
    messages at once hands them all out at that moment. A worker pool with a
    rate claims one message at a time for a handler of one message, so that
    what is limited is when the handler starts.
    """

    def __init__(self, group: str, rate: Rate) -> None:
        self.key = key("rate", group)
        self.rate = rate
        self._most = rate.count
        self._spacing = rate.interval * (1 + MARGIN)
        self._reach = rate.window * (1 + MARGIN)  # the furthest a claim sets ``due`` ahead

    def allow(self, conn, now: float, want: int) -> Tuple[int, float]:
        """``(n, due)``: claim at most ``n`` messages now (0: none before ``due``)."""
        due = self.next_due(conn, now)
        if now < due:
            return 0, due
        n = 1 + int((now - due) / self._spacing)
        return min(want, self._most, n), due

    def spend(self, conn, now: float, n: int) -> None:
        """Record ``n`` hand-outs made at ``now``."""
        put(conn, self.key, now + n * self._spacing)

    def next_due(self, conn, now: Optional[float] = None) -> float:
        """Epoch seconds of the group's next allowed hand-out (a read).

        At this rate no claim sets it further ahead than N spacings (``k <=
        N`` hand-outs at ``t <= now`` set ``t + k * spacing``), so a due time
        beyond that was set by a pool with a slower rate (or before the clock
        was set back): it is ignored, and must not stall this pool.
        """
        due = get(conn, self.key)
        if due is None:
            return 0.0
        now = time.time() if now is None else now
        return 0.0 if float(due) > now + self._reach else float(due)
