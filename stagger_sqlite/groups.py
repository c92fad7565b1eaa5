"""Consumer groups: competing members, independent groups, leases, fenced
acks, retries with backoff, dead letters (SPEC §4).

How it is stored (tables in schema.py):

- ``groups``: one row per group: ``cursor`` (every seq <= cursor has been
  handed out at least once) and ``token`` (the last claim token).
- ``deliveries``: a group's messages between their first hand-out and their
  finish. Finishing (ack, dead letter) deletes the row, so
  ``acked = min(cursor, lowest seq in deliveries - 1)`` whatever the order
  in which members finish.
- ``dead_letters``: finished without success, with their own copy of the body.

The costs: a member claims up to ``batch`` messages in one short write
transaction, which also deletes the rows it finished since its last claim
(implicit acks are batched; a message is finished locally, at once, when the
next one is asked for). Both are set-wise statements (``INSERT ... SELECT``,
a delete by token range): binding rows one by one from Python costs more than
SQLite's own work. Per message, the rest is Python-level work.

Hand-out order: due redeliveries first, in the order they fell due (index
``deliveries_ready``), then new messages in seqno order.

Which message killed a member? A member writes nothing when it starts a
message (that would be a transaction per message). When a batch's lease
expires, every unfinished message of it is counted as delivered once (it may
have been the one in hand) and is then handed out *alone* (state 3 -> 1):
a claim of one message is its start mark, so the message that keeps killing
its worker is the one whose lone deliveries keep expiring, and it reaches
``max_attempts`` while the innocent ones finish on their lone delivery. A
message is never dead-lettered on the strength of a batch expiry alone. Any
claim that hands out one message is alone (``batch=1``, or a claim that
found just one), and a member with ``max_attempts=1`` claims one message at
a time (its ``next()``; lists from ``next_batch`` stay lists): there, the
first death must already be pinned on the right message.

Batch hand-out (``next_batch``, for handlers that take a list): the whole
claim is handed out, and so started, at once, and finished together when the
next list is asked for. The crash rule above needs no change: a list handed
out together counts one attempt for each of its unfinished messages if its
lease expires (any of them may have killed the member), and they then come
back alone, one per claim, so only the killer reaches ``max_attempts``.

Leases: a claim's rows share a token and a lease deadline. A member renews
the deadline of what it still holds (and checks it still holds it) at a
hand-out once a tenth of the lease has passed since the claim or the last
renewal, so a message is redelivered once held for between 0.9 x lease and
lease seconds, however long the batch took.

Pause (``StaggerQueue.pause``): the flag is a ``settings`` row, read by every
claim and every renewal in their own transaction, so every member of every
process honours it: a paused claim hands out nothing (the member waits, or
stops with ``wait=False``), and a renewal that finds the group paused
releases the claimed, unstarted rest. What is in hand is finished normally.

Drop (``drop_group``): deletes the group's rows. A member of a dropped group
finds its group row gone at its next claim or renewal and ends (it never
creates the group again; only ``consume`` does). Claim tokens of a group
created again start above every dropped group's (``settings`` row
``token-floor``), so an old member's late ack cannot match a new row.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Deque, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import apsw

from . import control, schema
from .errors import AckOutOfRangeError, DecodeError, QueueClosedError, StaggerError
from .validate import check_bound, check_int, check_seconds, check_wait
from .wakeup import Waiter

if TYPE_CHECKING:  # groups is handed its queue; no import cycle at run time
    from .queue import StaggerQueue

#: Retry delay after the n-th failed delivery: min(BACKOFF_CAP,
#: BACKOFF_BASE * 2 ** (n - 1)) seconds, times a random factor in
#: [1 - BACKOFF_JITTER, 1] so members failing together do not retry together.
BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
BACKOFF_JITTER = 0.5

#: Renew a claim's lease at a hand-out once this share of it has passed.
RENEW_SHARE = 0.1

#: A member whose last claim got part of a batch (it keeps up with the
#: writers) claims again no sooner than this after it: claims of a message
#: or two each, under a steady stream, made members take the writer lock
#: about as often as the producers, and every hand-over of the lock between
#: processes costs (W4: 2 producers + 2 members went 1.4x as fast with it).
#: The price is at most this much latency, only while messages stream in.
CLAIM_GAP = 0.001

CLAIMED, CLAIMED_ALONE, WAITING, WAITING_ALONE = 0, 1, 2, 3

SQL_GROUP = "SELECT cursor, token FROM groups WHERE name = ?"
SQL_CREATE = "INSERT OR IGNORE INTO groups (name, cursor, token, created) VALUES (?, ?, ?, ?)"
SQL_PAUSED = "SELECT 1 FROM settings WHERE key = ?"
TOKEN_FLOOR = "token-floor"  # settings key: claim tokens of a new group start above it
SQL_SET_GROUP = "UPDATE groups SET cursor = ?, token = ? WHERE name = ?"
SQL_FINISH = "DELETE FROM deliveries WHERE grp = ? AND seq = ? AND token = ? AND state < 2"
SQL_DUE = """SELECT d.seq, d.state, d.attempts, d.error, coalesce(d.body, m.body)
    FROM deliveries d LEFT JOIN messages m ON m.seq = d.seq
    WHERE d.grp = ? AND d.ready <= ? ORDER BY d.ready, d.seq LIMIT ?"""
SQL_NEW = "SELECT seq, body FROM messages WHERE seq > ? ORDER BY seq LIMIT ?"
SQL_INSERT_NEW = """INSERT INTO deliveries (grp, seq, state, token, ready)
    SELECT ?, seq, ?, ?, ? FROM messages WHERE seq > ? ORDER BY seq LIMIT ?"""
SQL_ALONE = "UPDATE deliveries SET state = 1 WHERE grp = ? AND seq = ?"
SQL_FINISH_RANGE = "DELETE FROM deliveries WHERE grp = ? AND seq BETWEEN ? AND ? AND token = ? AND state < 2"
SQL_TAKE = "UPDATE deliveries SET state = ?, token = ?, ready = ? WHERE grp = ? AND seq = ?"
SQL_NEXT_READY = "SELECT min(ready) FROM deliveries WHERE grp = ?"
SQL_LOWEST = "SELECT min(seq) FROM deliveries WHERE grp = ?"
SQL_RELEASE = """UPDATE deliveries SET state = state + 2, token = 0, ready = ?
    WHERE grp = ? AND seq = ? AND token = ? AND state < 2"""
SQL_RENEW = "UPDATE deliveries SET ready = ? WHERE grp = ? AND seq = ? AND token = ? AND state < 2"
SQL_HELD = "SELECT 1 FROM deliveries WHERE grp = ? AND seq = ? AND token = ? AND state < 2"
SQL_ROW = """SELECT d.attempts, d.error, coalesce(d.body, m.body) FROM deliveries d
    LEFT JOIN messages m ON m.seq = d.seq WHERE d.grp = ? AND d.seq = ? AND d.token = ? AND d.state < 2"""
SQL_BURY = "INSERT OR REPLACE INTO dead_letters (grp, seq, body, attempts, error, at) VALUES (?, ?, ?, ?, ?, ?)"
SQL_DROP = "DELETE FROM deliveries WHERE grp = ? AND seq = ?"
SQL_SUSPECT = "UPDATE deliveries SET state = 3, token = 0, ready = ?, attempts = ?, error = ? WHERE grp = ? AND seq = ?"
SQL_RETRY = "UPDATE deliveries SET state = 2, token = 0, ready = ?, attempts = ?, error = ? WHERE grp = ? AND seq = ?"


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    """Figures of one consumer group (``StaggerQueue.groups()``).

    Attributes:
        acked: every message with seq <= acked is finished (acked or dead).
        in_flight: handed to a member, not yet finished or nacked.
        retrying: waiting for their next delivery after a failed one (nacked,
            or back from an expired lease). Messages released unstarted (on
            an exception or close) count in ``lag`` only, like new ones.
        lag: ``last_seq - acked``.
        dead: dead letters of the group.
        delivered: every message with seq <= delivered was handed out at
            least once.
        paused: the group is paused (``StaggerQueue.pause``).
    """

    acked: int
    in_flight: int
    retrying: int
    lag: int
    dead: int
    delivered: int
    paused: bool = False


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """A message a group gave up on (``StaggerQueue.dead_letters()``).

    Attributes:
        seq: its seqno.
        msg: the decoded message, or None when it cannot be decoded.
        attempts: deliveries that ended without an ack.
        error: the last error (nack text, exception text, expired lease, or
            the decode error).
        at: when it was dead-lettered (epoch seconds).
        body: the stored bytes.
    """

    seq: int
    msg: Any
    attempts: int
    error: Optional[str]
    at: float
    body: bytes = dataclasses.field(repr=False, default=b"")


def backoff(attempts: int) -> float:
    """Seconds before the next delivery after ``attempts`` failed ones."""
    delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(0, min(attempts - 1, 62)))
    return delay * random.uniform(1.0 - BACKOFF_JITTER, 1.0)


def check_group(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"`group` must be a non-empty string, not {name!r}")
    return name


# -- queries shared with StaggerQueue ------------------------------------


def acked_of(conn: apsw.Connection, name: str, cursor: int) -> int:
    lowest = conn.execute(SQL_LOWEST, (name,)).fetchall()[0][0]
    return cursor if lowest is None else min(cursor, lowest - 1)


def finished_floor(conn: apsw.Connection) -> Optional[int]:
    """The highest seq every group has finished (None: no group exists).
    Purge never goes beyond it."""
    floor: Optional[int] = None
    for name, cursor in conn.execute("SELECT name, cursor FROM groups").fetchall():
        acked = acked_of(conn, name, cursor)
        floor = acked if floor is None else min(floor, acked)
    return floor


#: Every live member of this process: ``local_finishes`` reads what they
#: finished and have not written yet.
_MEMBERS: "weakref.WeakSet[GroupConsumer]" = weakref.WeakSet()
_MEMBERS_LOCK = threading.Lock()  # a WeakSet is not safe to add to while another thread iterates it


def local_finishes(path: str) -> Dict[str, Set[Tuple[int, int]]]:
    """What the members of this process on the queue file ``path`` have
    finished (the next message was asked for) but not written yet (their
    next write deletes them): group -> {(seq, claim token)}."""
    real = os.path.realpath(path)
    out: Dict[str, Set[Tuple[int, int]]] = {}
    with _MEMBERS_LOCK:
        members = list(_MEMBERS)
    for m in members:
        if m._real_path == real:
            for group, seq, token in list(m._done):  # a copy: the member's thread may append
                out.setdefault(group, set()).add((seq, token))
    return out


def _unfinished(conn: apsw.Connection, name: str, cursor: int, done: Set[Tuple[int, int]]) -> Tuple[int, int]:
    """(acked, rows held by a member) of group ``name``, counting the
    member-held rows in ``done`` (finished in this process) as finished."""
    acked, held_done, lowest_found = cursor, 0, False
    for seq, token, state in conn.execute("SELECT seq, token, state FROM deliveries WHERE grp = ? ORDER BY seq", (name,)):
        if state < WAITING and (seq, token) in done:
            held_done += 1
            continue
        if not lowest_found:
            acked, lowest_found = min(cursor, seq - 1), True
        if held_done == len(done):
            break
    return acked, held_done


def group_figures(conn: apsw.Connection, local: Optional[Dict[str, Set[Tuple[int, int]]]] = None) -> Dict[str, GroupInfo]:
    """Every group's figures; run it inside one read transaction. ``local``:
    what members of this process finished and have not written yet
    (``local_finishes``), counted as finished, as it is."""
    last = schema.last_seq(conn)
    result = {}
    for name, cursor in conn.execute("SELECT name, cursor FROM groups ORDER BY name").fetchall():
        counts = dict(
            conn.execute(
                "SELECT state >= 2 AND attempts > 0, count(*) FROM deliveries WHERE grp = ? AND (state < 2 OR attempts > 0) "
                "GROUP BY 1",
                (name,),
            ).fetchall()
        )
        dead = conn.execute("SELECT count(*) FROM dead_letters WHERE grp = ?", (name,)).fetchall()[0][0]
        done = local.get(name) if local else None
        if done:
            acked, held_done = _unfinished(conn, name, cursor, done)
        else:
            acked, held_done = acked_of(conn, name, cursor), 0
        result[name] = GroupInfo(
            acked=acked,
            in_flight=counts.get(0, 0) - held_done,
            retrying=counts.get(1, 0),
            lag=last - acked,
            dead=dead,
            delivered=cursor,
            paused=is_paused(conn, name),
        )
    return result


def is_paused(conn: apsw.Connection, group: str) -> bool:
    return bool(conn.execute(SQL_PAUSED, (control.key("paused", group),)).fetchall())


def create_group(queue: "StaggerQueue", group: str, ack: int = 0) -> None:
    """Create ``group`` starting after seq ``ack``, unless it exists (then
    ``ack`` is ignored).

    Raises:
        AckOutOfRangeError: a new group's ``ack`` is beyond ``last_seq``.
    """

    def create(conn: apsw.Connection) -> None:
        if conn.execute(SQL_GROUP, (group,)).fetchall():
            return  # an existing group: its own position wins, `ack` is ignored
        last = schema.last_seq(conn)
        if ack > last:
            raise AckOutOfRangeError(
                f"ack={ack} is beyond the last seqno ever written to {queue.path} ({last}): "
                "that message was never written"
            )
        floor = control.get(conn, TOKEN_FLOOR) or 0
        conn.execute(SQL_CREATE, (group, ack, floor, time.time()))

    storage = queue._storage
    if not storage.read(lambda conn: bool(conn.execute(SQL_GROUP, (group,)).fetchall())):
        storage.write(create, notify=False)


def set_paused(queue: "StaggerQueue", group: str, paused: bool) -> None:
    """Set or clear ``group``'s pause flag (the group need not exist yet).
    Clearing it rings, so waiting members wake and claim at once."""
    check_group(group)
    key = control.key("paused", group)

    def change(conn: apsw.Connection) -> None:
        if paused:
            control.put(conn, key, time.time())
        else:
            conn.execute("DELETE FROM settings WHERE key = ?", (key,))

    queue._storage.write(change, notify=not paused)


def drop_group(queue: "StaggerQueue", group: str) -> bool:
    """Delete ``group``: its row, its deliveries, its dead letters, its pause
    flag and rate-limit state. Returns whether the group existed.

    Its live members end at their next claim or renewal; their acks and nacks
    return False (see the module docstring)."""
    check_group(group)

    def drop(conn: apsw.Connection) -> bool:
        row = conn.execute(SQL_GROUP, (group,)).fetchall()
        conn.execute("DELETE FROM deliveries WHERE grp = ?", (group,))
        conn.execute("DELETE FROM dead_letters WHERE grp = ?", (group,))
        conn.execute(
            "DELETE FROM settings WHERE key IN (?, ?)", (control.key("paused", group), control.key("rate", group))
        )
        if not row:
            return False
        token = row[0][1]
        if token > (control.get(conn, TOKEN_FLOOR) or 0):
            control.put(conn, TOKEN_FLOOR, token)
        conn.execute("DELETE FROM groups WHERE name = ?", (group,))
        return True

    # The ring wakes the group's waiting members, so they see it and end.
    return queue._storage.write(drop)


def dead_letters(queue: "StaggerQueue", group: str) -> List[DeadLetter]:
    """The group's dead letters, by seq (empty for an unknown group)."""
    check_group(group)
    rows = queue._storage.read(
        lambda conn: conn.execute(
            "SELECT seq, body, attempts, error, at FROM dead_letters WHERE grp = ? ORDER BY seq", (group,)
        ).fetchall()
    )
    result = []
    for seq, body, attempts, error, at in rows:
        try:
            msg = queue.decode(body, seq)
        except DecodeError:
            msg = None
        result.append(DeadLetter(seq=seq, msg=msg, attempts=attempts, error=error, at=at, body=bytes(body)))
    return result


def requeue(queue: "StaggerQueue", group: str, seqs: Optional[Sequence[int]] = None) -> int:
    """Move dead letters (all, or those in ``seqs``) back for delivery now,
    with their attempts reset. Returns how many moved."""
    check_group(group)
    wanted = None if seqs is None else [check_bound("seqs item", s, 1) for s in seqs]

    def move(conn: apsw.Connection) -> int:
        if wanted is None:
            rows = conn.execute("SELECT seq, body FROM dead_letters WHERE grp = ?", (group,)).fetchall()
        else:
            rows = []
            for s in wanted:
                rows += conn.execute("SELECT seq, body FROM dead_letters WHERE grp = ? AND seq = ?", (group, s)).fetchall()
        now = time.time()
        for seq, body in rows:
            conn.execute(
                "INSERT OR REPLACE INTO deliveries (grp, seq, state, token, ready, attempts, body) VALUES (?, ?, 2, 0, ?, 0, ?)",
                (group, seq, now, body),
            )
            conn.execute("DELETE FROM dead_letters WHERE grp = ? AND seq = ?", (group, seq))
        return len(rows)

    return queue._storage.write(move)


def _bury(conn: apsw.Connection, group: str, seq: int, body: Optional[bytes], attempts: int, error: Optional[str]) -> None:
    """Move one delivery to the dead letters."""
    if body is not None:
        conn.execute(SQL_BURY, (group, seq, body, attempts, error, time.time()))
    conn.execute(SQL_DROP, (group, seq))


def _error_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _error_arg(error: Any) -> Optional[str]:
    """``nack``'s ``error``: kept as text (an exception: its message)."""
    if error is None or isinstance(error, str):
        return error
    if isinstance(error, BaseException):
        return _error_text(error)
    if isinstance(error, (bytes, bytearray)):
        return bytes(error).decode("utf-8", "replace")
    return str(error)


# -- the member -------------------------------------------------------------


class GroupConsumer:
    """One member of a consumer group: an iterator of ``(seq, msg)``.

    Built by ``StaggerQueue.consume(group=...)``; use it as a context manager
    (its ``__exit__`` sees an exception of the loop body). One member belongs
    to one thread; any number of members, in any processes, compete.

    A message is finished when the next one (or the next list, with
    ``next_batch``) is asked for, at a normal close, or by ``ack``; ``nack``
    sends it back for a later delivery. See the module docstring for leases,
    attempts, pause and drop.

    Memory follows the file: every write transaction returns what it did, and
    the member's own state changes only once it committed.
    """

    def __init__(
        self,
        queue: "StaggerQueue",
        group: str,
        *,
        ack: int,
        batch: int,
        lease: float,
        max_attempts: int,
        wait: Union[bool, float],
        purge: Optional[int] = None,
    ) -> None:
        self.group = check_group(group)
        check_int("ack", ack, maximum=None)  # beyond last_seq: AckOutOfRangeError
        self._batch = check_bound("batch", batch, 1)
        self._lease: float = check_seconds("lease", lease, allow_none=False, positive=True)  # type: ignore[assignment]
        self._max_attempts = check_bound("max_attempts", max_attempts, 1)
        self._wait = check_wait(wait)
        if purge is not None:
            purge = check_bound("purge", purge)
        self._queue = queue
        self._storage = queue._storage
        self._loads = queue._codec.loads
        self._rows: Deque[Tuple[int, bytes]] = collections.deque()
        self._token = 0  # of the claim in self._rows
        self._renew_at = 0.0
        #: Handed out, not finished yet: ``(seq, claim token)``; the message
        #: from ``next()``, or the list from ``next_batch()``.
        self._hand: List[Tuple[int, int]] = []
        self._done: List[Tuple[str, int, int]] = []  # finished locally, to delete at the next write
        self._idle = False  # the last claim found nothing: look before taking the writer lock
        self._partial_at: Optional[float] = None  # when the last claim got part of a batch (CLAIM_GAP)
        self._idle_deadline: Optional[float] = None  # on self: under asyncio __next__ is re-entered
        #: Optional hook (the worker pool's rate limit, ``control.RateLimiter``):
        #: ``allow(conn, now, want) -> (n, due)`` caps a claim at ``n`` messages
        #: (0: claim nothing, wait until ``due``); ``spend(conn, now, n)``
        #: records ``n`` hand-outs. Both run inside the claim's transaction.
        #: ``next_due(conn)``: the time of the next allowed hand-out, read by
        #: an idle member before it takes the writer lock.
        self.claim_limit: Any = None
        self._closed = False
        self._dropped = False
        self._entered = False
        # Before the first claim (the Waiter protocol): no ring is missed.
        self._waiter = Waiter(self._storage)
        self._ack, self._purge = ack, purge
        self._real_path = os.path.realpath(queue.path)
        with _MEMBERS_LOCK:
            _MEMBERS.add(self)

    def _begin(self) -> None:
        """The writes that come with making the member: the group's creation
        (unless it exists) and the purge (run by ``consume`` at once, by
        ``aconsume`` where they cannot block the loop).

        Raises:
            AckOutOfRangeError: a new group's ``ack`` is beyond ``last_seq``.
        """
        create_group(self._queue, self.group, self._ack)
        if self._purge is not None:
            self._queue.purge(self._purge)

    @property
    def dropped(self) -> bool:
        """True once this member found its group dropped
        (``StaggerQueue.drop_group``): it hands out nothing more."""
        return self._dropped

    # -- iteration -------------------------------------------------------

    def __iter__(self) -> Iterator[Tuple[int, Any]]:
        try:
            while True:
                try:
                    item = self.__next__()
                except StopIteration:
                    return
                yield item
        except GeneratorExit:
            # The loop was left early, by `break` or by an exception: Python
            # does not tell them apart here (both just drop the iterator).
            # Inside `with`, __exit__ knows and decides. Without it, release
            # the unstarted rest at once (always safe) and leave the message
            # in hand as it is: the next `next()`, `ack` or `close()` finishes
            # it; if none comes, its lease expires and it is delivered again.
            conn = self._storage._conn
            if conn is not None and conn.in_transaction:
                raise  # finalized from inside a transaction (a GC pass): leave it to the lease
            if not self._entered and not self._closed:
                try:
                    self._end(keep_in_hand=True)
                except Exception:
                    # The lease covers it. Any error: a generator can be
                    # finalized by the GC in a thread that is inside a call
                    # of the same connection (apsw: ThreadingViolationError).
                    pass
            raise

    def __next__(self) -> Tuple[int, Any]:
        """Finish the message(s) in hand, then return the next ``(seq, msg)``.

        Raises:
            StopIteration: closed, queue closed, group dropped, nothing
                claimable with ``wait=False``, or ``wait`` seconds without
                anything claimable (a later call waits again).
        """
        if self._hand:
            self._finish_hand()
        # Fast path, a claimed message in memory and no lease renewal due:
        # this runs once per message, so it skips the layers below.
        rows = self._rows
        if rows and not self._closed and not self._storage._closed and time.time() < self._renew_at:
            seq, body = rows.popleft()
            try:
                msg = self._loads(body)
            except Exception:
                rows.appendleft((seq, body))  # the slow path dead-letters it
            else:
                self._hand = [(seq, self._token)]
                return seq, msg
        while True:
            # max_attempts=1: a death must be pinned on one message at its
            # first delivery, so each is claimed alone (its start mark).
            self._fill(self._batch if self._max_attempts > 1 else 1)
            seq, body = self._rows.popleft()
            token = self._token
            try:
                msg = self._queue.decode(body, seq)
            except DecodeError as e:
                error = str(e)
                self._safely(lambda: self._bury_undecodable(seq, token, error))
                continue
            self._hand = [(seq, token)]
            return seq, msg

    def next_batch(self, n: Optional[int] = None) -> List[Tuple[int, Any]]:
        """Finish the message(s) in hand, then hand out the next list of up
        to ``n`` messages (default: the consumer's ``batch``) at once.

        For handlers that take a list: one write transaction per list claims
        it and finishes the previous one. Every message of the list is in
        hand (started) until the next ``next_batch()`` or ``next()``, a
        normal close or the end of the ``with`` block finishes it; ``ack`` and
        ``nack`` act on one seq, ``nack_all`` on every one left; an exception
        leaving the ``with`` block nacks them all. If the member dies, each
        unfinished message of the list counts one attempt and comes back
        alone (see the module docstring). Waits as ``next()`` does, and
        returns what is claimable as soon as something is: a list may be
        shorter than ``n`` (a redelivery after a crash comes alone).

        Returns:
            ``[(seq, msg), ...]`` in hand-out order; ``[]`` where iteration
            would stop (closed, queue closed, group dropped, nothing
            claimable with ``wait=False``, ``wait`` seconds idle).

        Raises:
            ValueError: ``n`` is not an integer >= 1.
        """
        want = self._batch if n is None else check_bound("n", n, 1)
        if self._hand:
            self._finish_hand()
        out: List[Tuple[int, Any]] = []
        while not out:
            try:
                self._fill(want)
            except StopIteration:
                return []
            token = self._token
            while self._rows and len(out) < want:
                seq, body = self._rows.popleft()
                try:
                    out.append((seq, self._queue.decode(body, seq)))
                except DecodeError as e:
                    error = str(e)
                    try:
                        self._safely(lambda: self._bury_undecodable(seq, token, error))
                    except StopIteration:
                        return []
        self._hand = [(seq, token) for seq, _ in out]
        return out

    def _finish_hand(self) -> None:
        """The messages in hand are finished: delete them at the next write."""
        group = self.group
        self._done.extend([(group, seq, token) for seq, token in self._hand])
        self._hand = []

    def _fill(self, want: int) -> None:
        """Return once claimed rows wait in ``self._rows`` (their lease
        renewed if due), claiming up to ``want`` and waiting as ``wait`` says.

        Raises:
            StopIteration: as ``__next__``.
        """
        while True:
            if self._closed or self._dropped or self._storage.closed:
                raise StopIteration
            if self._rows:
                if time.time() >= self._renew_at:
                    self._safely(self._renew)
                    continue
                return
            if self._partial_at is not None:
                gap = self._partial_at + CLAIM_GAP - time.monotonic()
                if gap > 0 and self._wait is not False:  # (wait=False: stop when caught up)
                    # Through the waiter, not a sleep: close ends it, and
                    # under asyncio the event loop runs on meanwhile.
                    if not self._waiter.wait(gap):
                        raise StopIteration
                    continue
                self._partial_at = None
            next_ready = self._safely(lambda: self._claim(want))
            if self._rows:
                self._idle_deadline = None
                self._waiter.reset()
                continue
            if self._dropped:
                raise StopIteration
            # Nothing claimable. Scheduled messages that are due become
            # messages now (no daemon does it).
            until_due = self._safely(self._queue._until_due)
            if until_due is not None and until_due <= 0:
                self._safely(self._queue._promote_due)
                continue
            if self._wait is False:
                raise StopIteration
            now = time.time()
            timeout: Optional[float] = None
            if self._wait is not True:
                if self._idle_deadline is None:
                    self._idle_deadline = time.monotonic() + self._wait
                timeout = self._idle_deadline - time.monotonic()
                if timeout <= 0:
                    self._idle_deadline = None  # a later call waits `wait` seconds again
                    raise StopIteration
            for until in (
                # A redelivery (expired lease, retry) falls due then: wake for
                # it with no new write.
                None if next_ready is None else max(0.0, next_ready - now) + 0.001,
                until_due,
            ):
                if until is not None:
                    timeout = until if timeout is None else min(timeout, until)
            if not self._waiter.wait(timeout):
                raise StopIteration

    def _safely(self, fn: Any) -> Any:
        """Run a storage step; a queue closed under us ends the loop quietly."""
        try:
            return fn()
        except QueueClosedError:
            raise StopIteration from None

    def _write(self, fn: Any, *, notify: bool = False) -> Any:
        """``Storage.write`` of ``fn(conn, done)``, where ``done`` are the
        implicit acks to delete in the same transaction; if it fails they are
        kept for the next write."""
        done, self._done = self._done, []
        try:
            return self._storage.write(lambda conn: fn(conn, done), notify=notify)
        except BaseException:
            self._done[:0] = done
            raise

    # -- the write transactions (they touch the file only) ---------------

    def _claim(self, want: int) -> Optional[float]:
        """Finish what is done, claim up to ``want`` messages into self._rows.
        Returns, when nothing was claimed, when the next delivery falls due.
        Sets ``self._dropped`` when the group is gone."""
        if self._idle and not self._done:
            # Nothing was claimable last time: look (a read) before queuing
            # for the writer lock, so idle members cost writers nothing.
            now = time.time()
            claimable, ready = self._storage.read(lambda conn: self._lookup(conn, now), snapshot=True)
            if not claimable:
                return ready
        # Every row this member still holds is in self._done now (nothing in
        # hand, nothing unhanded), so the claim may delete them by token range.
        whole = not self._rows and not self._hand
        claimed = self._write(lambda conn, done: self._claim_tx(conn, done, whole, want))
        if claimed is None:
            self._dropped = True
            return None
        rows, token, ready = claimed
        self._idle = not rows
        self._partial_at = time.monotonic() if 0 < len(rows) < want else None
        if rows:
            self._rows.extend(rows)
            self._token = token
            self._renew_at = time.time() + self._lease * RENEW_SHARE
        return ready

    def _lookup(self, conn: apsw.Connection, now: float) -> Tuple[bool, Optional[float]]:
        """(something may be claimable, when the next delivery falls due)."""
        row = conn.execute(SQL_GROUP, (self.group,)).fetchall()
        if not row:
            return True, None  # dropped: the claim finds out and ends the member
        if is_paused(conn, self.group):
            return False, None  # resume rings
        if self.claim_limit is not None:
            due = self.claim_limit.next_due(conn)
            if due > now:
                return False, due
        if schema.last_seq(conn) > row[0][0]:
            return True, None
        ready = conn.execute(SQL_NEXT_READY, (self.group,)).fetchall()[0][0]
        return (ready is not None and ready <= now), ready

    def _claim_tx(
        self, conn: apsw.Connection, done: List[Tuple[str, int, int]], whole: bool, want: int
    ) -> Optional[Tuple[List[Tuple[int, bytes]], int, Optional[float]]]:
        """One transaction: delete the finished, sweep expired leases, claim
        up to ``want``. None: the group was dropped. Claims nothing (and
        returns no due time: resume rings) while the group is paused.

        Due redeliveries come first (in the order they fell due), then new
        messages in seqno order. A message back from an expired batch lease
        is claimed alone (see the module docstring).

        ``whole``: ``done`` holds every row this member still holds, so each
        claim token's rows go in one range delete (tokens are unique to one
        claim, so the range cannot touch anyone else's rows)."""
        now = time.time()
        group = self.group
        if done and whole:
            spans: Dict[int, List[int]] = {}
            for _, seq, tok in done:
                span = spans.get(tok)
                if span is None:
                    spans[tok] = [seq, seq]
                elif seq < span[0]:
                    span[0] = seq
                elif seq > span[1]:
                    span[1] = seq
            conn.executemany(SQL_FINISH_RANGE, [(group, lo, hi, tok) for tok, (lo, hi) in spans.items()])
        elif done:
            conn.executemany(SQL_FINISH, done)
        row = conn.execute(SQL_GROUP, (group,)).fetchall()
        if not row:
            return None  # dropped: never create it again from here
        if is_paused(conn, group):
            return [], 0, None
        cursor, token = row[0]
        token += 1
        deadline = now + self._lease
        batch = want
        if self.claim_limit is not None:
            batch, due = self.claim_limit.allow(conn, now, batch)
            if batch < 1:
                return [], 0, due
        alone: Optional[Tuple[int, bytes]] = None
        again: List[Tuple[int, bytes]] = []
        for seq, state, attempts, error, body in conn.execute(SQL_DUE, (group, now, batch)).fetchall():
            if body is None:  # cannot happen: purge stops below unfinished messages
                conn.execute(SQL_DROP, (group, seq))
                continue
            if state < WAITING:  # a lease expired: the member died or overran it
                attempts += 1
                error = f"lease of {self._lease:g} s expired (the member died or held it too long)"
                if state == CLAIMED_ALONE and attempts >= self._max_attempts:
                    _bury(conn, group, seq, body, attempts, error)
                    continue
                conn.execute(SQL_SUSPECT, (now, attempts, error, group, seq))
                state = WAITING_ALONE
            if state == WAITING_ALONE:
                if alone is None:
                    alone = (seq, body)
            else:
                again.append((seq, body))
        if alone is not None:
            # Handed out on its own: this claim is the message's start mark.
            conn.execute(SQL_TAKE, (CLAIMED_ALONE, token, deadline, group, alone[0]))
            rows = [alone]
        else:
            # A claim of one message is its start mark too (see the module
            # docstring): known before (batch 1) or after (it got just one).
            taken = CLAIMED_ALONE if batch == 1 else CLAIMED
            conn.executemany(SQL_TAKE, [(taken, token, deadline, group, seq) for seq, _ in again])
            rows = again
            want = batch - len(again)
            if want > 0:
                # One statement for the rows (binding them one by one costs
                # more than SQLite's own work), then the same rows' bodies:
                # nobody else writes while we hold the writer lock.
                conn.execute(SQL_INSERT_NEW, (group, taken, token, deadline, cursor, want))
                new = conn.execute(SQL_NEW, (cursor, want)).fetchall()
                schema.check_run(conn, self._queue.path, cursor, new)
                if new:
                    cursor = new[-1][0]
                    rows = rows + new
                if len(new) < want:
                    cursor = max(cursor, schema.last_seq(conn))  # everything above was purged or never written
            if len(rows) == 1 and taken == CLAIMED:
                conn.execute(SQL_ALONE, (group, rows[0][0]))
        if rows:
            conn.execute(SQL_SET_GROUP, (cursor, token, group))
            if self.claim_limit is not None:
                self.claim_limit.spend(conn, now, len(rows))
            return rows, token, None
        conn.execute(SQL_SET_GROUP, (cursor, token - 1, group))
        return [], 0, conn.execute(SQL_NEXT_READY, (group,)).fetchall()[0][0]

    def _renew(self) -> None:
        """Push the lease of what this member still holds; drop what it lost."""
        token, seqs = self._token, [seq for seq, _ in self._rows]

        def renew(conn: apsw.Connection, done: List[Tuple[str, int, int]]) -> Optional[set]:
            if done:
                conn.executemany(SQL_FINISH, done)
            if is_paused(conn, self.group):
                # Paused: give the claimed, unstarted rest back now.
                now = time.time()
                conn.executemany(SQL_RELEASE, [(now, self.group, seq, token) for seq in seqs])
                return set()
            before = conn.total_changes()
            deadline = time.time() + self._lease
            conn.executemany(SQL_RENEW, [(deadline, self.group, seq, token) for seq in seqs])
            if conn.total_changes() - before == len(seqs):
                return None
            return {seq for seq in seqs if conn.execute(SQL_HELD, (self.group, seq, token)).fetchall()}

        held = self._write(renew)
        if held is not None and token == self._token:
            kept = [r for r in self._rows if r[0] in held]
            self._rows.clear()
            self._rows.extend(kept)
        self._renew_at = time.time() + self._lease * RENEW_SHARE

    def _bury_undecodable(self, seq: int, token: int, error: str) -> None:
        def bury(conn: apsw.Connection, done: List[Tuple[str, int, int]]) -> None:
            if done:
                conn.executemany(SQL_FINISH, done)
            row = conn.execute(SQL_ROW, (self.group, seq, token)).fetchall()
            if row:
                attempts, _, body = row[0]
                _bury(conn, self.group, seq, body, attempts + 1, error)

        self._write(bury)

    # -- ack / nack ------------------------------------------------------

    def _token_of(self, seq: int) -> Optional[int]:
        for s, token in self._hand:
            if s == seq:
                return token
        if any(s == seq for s, _ in self._rows):
            return self._token
        return None

    def _forget(self, seq: int) -> None:
        hand = [h for h in self._hand if h[0] != seq]
        if len(hand) < len(self._hand):
            self._hand = hand
        elif any(s == seq for s, _ in self._rows):
            kept = [r for r in self._rows if r[0] != seq]
            self._rows.clear()
            self._rows.extend(kept)

    def ack(self, seq: int) -> bool:
        """Finish message ``seq`` now.

        Returns True when it took effect; False when this member no longer
        holds it (its lease expired and it may be with another member, it was
        already finished, or it was never handed to this member).

        Raises:
            ValueError: ``seq`` is not a positive integer.
            LockTimeoutError, StorageFullError, QueueClosedError: the write
                failed (the message stays held until its lease expires).
        """
        seq = check_bound("seq", seq, 1)
        token = self._token_of(seq)
        if token is None:
            pending = [d for d in self._done if d[1] == seq]
            if not pending:
                return False
            # Finished locally when the next message was asked for: make it so now.
            token = pending[0][2]
            self._done = [d for d in self._done if d[1] != seq]

        def finish(conn: apsw.Connection, done: List[Tuple[str, int, int]]) -> bool:
            if done:
                conn.executemany(SQL_FINISH, done)
            conn.execute(SQL_FINISH, (self.group, seq, token))
            return conn.changes() > 0

        result = self._write(finish)
        self._forget(seq)
        return result

    def nack(self, seq: int, *, delay: Optional[float] = None, error: Any = None, dead: bool = False) -> bool:
        """Send message ``seq`` back for a later delivery, to any member.

        Args:
            delay: seconds before it is delivered again; None: exponential
                backoff with jitter (see ``backoff``).
            error: why, kept as the message's last error (shown by
                ``dead_letters``): a str, or an exception (kept as its text).
            dead: dead-letter it now, whatever its attempts (a failure that
                no retry can mend, e.g. an HTTP 400 from ``forward``).

        Returns True when it took effect, False when this member no longer
        holds the message (as ``ack``). After ``max_attempts`` failed
        deliveries the message goes to the dead letters instead.

        Raises:
            ValueError: a bad ``seq`` or ``delay``.
            LockTimeoutError, StorageFullError, QueueClosedError: as ``ack``.
        """
        seq = check_bound("seq", seq, 1)
        if delay is not None:
            delay = check_seconds("delay", delay)
        error = _error_arg(error)
        token = self._token_of(seq)
        if token is None:
            return False

        def tx(conn: apsw.Connection, done: List[Tuple[str, int, int]]) -> bool:
            if done:
                conn.executemany(SQL_FINISH, done)
            return self._nack_row(conn, seq, token, delay, error, dead)

        result = self._write(tx, notify=True)
        self._forget(seq)
        return result

    def nack_all(self, *, delay: Optional[float] = None, error: Any = None) -> int:
        """``nack`` every message in hand (the list from ``next_batch``, or
        the message from ``next()``) not acked or nacked yet, in one
        transaction. Returns how many took effect (see ``nack``).

        Raises:
            ValueError: a bad ``delay``.
        """
        if delay is not None:
            delay = check_seconds("delay", delay)
        error = _error_arg(error)
        hand = self._hand
        if not hand:
            return 0

        def tx(conn: apsw.Connection, done: List[Tuple[str, int, int]]) -> int:
            if done:
                conn.executemany(SQL_FINISH, done)
            return sum(self._nack_row(conn, seq, token, delay, error) for seq, token in hand)

        result = self._write(tx, notify=True)
        self._hand = []
        return result

    def _nack_row(
        self, conn: apsw.Connection, seq: int, token: int, delay: Optional[float], error: Optional[str], dead: bool = False
    ) -> bool:
        """Retry (or bury) ``seq`` if this member still holds it under ``token``."""
        row = conn.execute(SQL_ROW, (self.group, seq, token)).fetchall()
        if not row:
            return False
        attempts, _, body = row[0]
        attempts += 1
        if dead or attempts >= self._max_attempts:
            _bury(conn, self.group, seq, body, attempts, error)
            return True
        due = time.time() + (backoff(attempts) if delay is None else delay)
        conn.execute(SQL_RETRY, (due, attempts, error, self.group, seq))
        return True

    # -- ending ----------------------------------------------------------

    def _end(self, *, failure: Optional[str] = None, release_in_hand: bool = False, keep_in_hand: bool = False) -> None:
        """One write: finish what is done and the message(s) in hand (unless
        ``failure``: nack them with that error; ``release_in_hand``; or
        ``keep_in_hand``), and release the unstarted rest at once."""
        hand = [] if keep_in_hand else self._hand
        unstarted = [(seq, self._token) for seq, _ in self._rows]
        nack: List[Tuple[int, int]] = []
        if release_in_hand:
            unstarted += hand
        elif failure is not None:
            nack = hand
        else:
            self._done.extend([(self.group, seq, token) for seq, token in hand])
        if self._done or unstarted or nack:

            def end(conn: apsw.Connection, done: List[Tuple[str, int, int]]) -> None:
                if done:
                    conn.executemany(SQL_FINISH, done)
                for seq, token in nack:
                    self._nack_row(conn, seq, token, None, failure)
                if unstarted:
                    now = time.time()
                    conn.executemany(SQL_RELEASE, [(now, self.group, seq, token) for seq, token in unstarted])

            try:
                self._write(end, notify=bool(unstarted or nack))
            except QueueClosedError:
                self._done.clear()  # what it held comes back when its lease expires
        self._rows.clear()
        if not keep_in_hand:
            self._hand = []

    def close(self) -> None:
        """Finish the message(s) in hand, release the unstarted rest at once,
        and stop. Idempotent; never raises because a lease was lost.

        Called while an exception is being handled (in an ``except`` or a
        ``finally`` the exception passes through) with a message in hand, it
        acts as the end of a ``with`` block that exception leaves: the
        message in hand is nacked with its text (released, for
        ``KeyboardInterrupt`` and kin), never finished. So ``try: for ...
        finally: c.close()`` treats a failure as ``with`` does.
        """
        if self._closed:
            return
        exc = sys.exc_info()[1]
        # (GeneratorExit: a generator around the loop was closed, the normal end)
        if exc is not None and self._hand and not isinstance(exc, (GeneratorExit, StopIteration, StopAsyncIteration)):
            self.__exit__(type(exc), exc, exc.__traceback__)
        else:
            self._finish()

    def _finish(self) -> None:
        """The normal end: finish what is in hand, release the rest, stop."""
        try:
            self._end()
        finally:
            self._closed = True
            self._waiter.close()

    def __enter__(self) -> "GroupConsumer":
        self._entered = True
        return self

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> None:
        if self._closed:
            return
        if exc is None:
            self._finish()  # not close(): the block may sit in an outer `except`
            return
        try:
            if isinstance(exc, Exception):
                self._end(failure=_error_text(exc))
            else:  # KeyboardInterrupt, SystemExit: not the message's fault
                self._end(release_in_hand=True)
        except StaggerError:
            pass  # do not hide the loop's own exception; leases cover the rest
        finally:
            self._closed = True
            self._waiter.close()

    def __repr__(self) -> str:
        return f"<GroupConsumer group={self.group!r} of {self._queue.path!r}>"
