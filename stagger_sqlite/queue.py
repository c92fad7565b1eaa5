"""StaggerQueue: the public face of one queue file.

Seqnos, writes, purge and the figures; consuming is built by ``consume.py``
(handed this queue, so neither module imports the other at run time).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import os
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import apsw

from . import aio
from . import codec as codecs
from . import schema
from . import groups as groups_
from .consume import Consumer
from .errors import AckOutOfRangeError, QueueClosedError, StaggerError
from .storage import Storage
from .schema import last_seq
from .validate import check_bound, check_int, check_seconds

DURABILITIES = ("full", "normal")

SQL_INSERT = "INSERT INTO messages (body) VALUES (?)"
SQL_COUNT = "SELECT count(*) FROM messages"
SQL_PAGE = "SELECT seq, body FROM messages WHERE seq > ? ORDER BY seq LIMIT ?"
SQL_PURGE = "DELETE FROM messages WHERE seq <= ?"
SQL_SCHEDULE = "INSERT INTO scheduled (due, body) VALUES (?, ?)"
# min() over the (due, id) index: one b-tree descent, a few microseconds.
SQL_NEXT_DUE = "SELECT min(due) FROM scheduled"
# Due entries become messages in due order (ties: scheduling order), so their
# seqnos follow their due times.
SQL_PROMOTE = "INSERT INTO messages (body) SELECT body FROM scheduled WHERE due <= ? ORDER BY due, id"
SQL_UNSCHEDULE = "DELETE FROM scheduled WHERE due <= ?"

#: Hand free pages back to the OS once they are this share of the file (and
#: at least RECLAIM_MIN_PAGES): under a steady write+purge load the free pages
#: are reused by new writes, so vacuuming each purge would only churn.
RECLAIM_SHARE = 0.25

#: A write looks for due scheduled entries when the earliest due time this
#: process knows of has come, and at least this often, since another process
#: may have scheduled an earlier one. Looking at every write would cost one
#: query (3-4 us of CPU, ~10 % of a durability="normal" write). Waiting
#: consumers do not depend on it: a schedule rings them and they promote.
DUE_CHECK_INTERVAL = 0.05
RECLAIM_MIN_PAGES = 256


def append(conn: apsw.Connection, bodies: List[bytes]) -> List[int]:
    """Insert encoded messages; their seqnos are consecutive because the
    caller holds the writer lock for the whole transaction."""
    if len(bodies) == 1:
        conn.execute(SQL_INSERT, (bodies[0],))  # the common case; executemany costs more
    else:
        conn.executemany(SQL_INSERT, zip(bodies))  # 1-tuples, made in C
    last = conn.last_insert_rowid()
    return list(range(last - len(bodies) + 1, last + 1))


def promote(conn: apsw.Connection, now: float) -> Tuple[int, Optional[float]]:
    """Turn scheduled entries due by ``now`` (epoch seconds) into messages.
    The caller is in a write transaction.

    Returns how many were promoted and the due time of the next entry (None:
    none left). Run by writes and by caught-up consumers: there is no daemon,
    any activity promotes.
    """
    due = conn.execute(SQL_NEXT_DUE).fetchall()[0][0]
    if due is None or due > now:
        return 0, due
    conn.execute(SQL_PROMOTE, (now,))
    moved = conn.changes()
    conn.execute(SQL_UNSCHEDULE, (now,))
    return moved, conn.execute(SQL_NEXT_DUE).fetchall()[0][0]


def due_time(delay: Any, at: Any) -> float:
    """Epoch seconds of ``schedule(delay=|at=)``, checked in the caller's words.

    Raises:
        ValueError: neither or both given, a negative or non-finite delay, a
            naive datetime, or an ``at`` that is neither datetime nor number.
    """
    if (delay is None) == (at is None):
        raise ValueError("schedule() takes exactly one of `delay` (seconds) or `at` (datetime or epoch seconds)")
    if delay is not None:
        seconds = check_seconds("delay", delay, allow_none=False)
        if not math.isfinite(seconds):
            raise ValueError(f"`delay` must be a finite number of seconds, not {delay!r}")
        return time.time() + seconds
    if isinstance(at, datetime.datetime):
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError(f"`at` must be a timezone-aware datetime, not the naive {at!r}")
        return at.timestamp()
    try:
        seconds = float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else math.nan
    except OverflowError:  # an int beyond any float
        seconds = math.inf
    if not math.isfinite(seconds):
        raise ValueError(f"`at` must be a timezone-aware datetime or finite epoch seconds, not {at!r:.60}")
    return seconds


def reclaim(conn: apsw.Connection) -> None:
    """Give free pages back to the OS a slice at a time (INCREMENTAL vacuum)."""
    free = conn.execute("PRAGMA freelist_count").fetchall()[0][0]
    if free >= RECLAIM_MIN_PAGES:
        pages = conn.execute("PRAGMA page_count").fetchall()[0][0]
        if free >= pages * RECLAIM_SHARE:
            conn.execute(f"PRAGMA incremental_vacuum({free})").fetchall()


class StaggerQueue:
    """A durable, multi-process message queue in one SQLite file.

    Args:
        path: the queue file; created (with ``mode``) if missing.
        codec: ``"cbor"`` (default), ``"json"``, ``"raw"`` or an object with
            ``dumps(obj) -> bytes`` and ``loads(bytes) -> obj``.
        durability: ``"full"``: a write that returned survives power loss,
            and its consumers hand out only messages that would.
            ``"normal"``: it survives any process crash; the last commits may
            be lost on power loss or OS crash.
        timeout: seconds a write may wait for the writer lock (None: forever).
        mode: permission bits of a file it creates, and of its lock file.

    Raises:
        ValueError: a bad ``codec``, ``durability``, ``timeout`` or ``mode``.
        NotAQueueError: the path is a directory, not SQLite, a SQLite file of
            another schema, or of a newer format version (left untouched).
        FileNotFoundError: the directory does not exist.
        PermissionError: the file or directory cannot be opened.

    One object may be shared by threads; it keeps working in a child after
    ``os.fork()`` (the child opens its own connection).
    """

    def __init__(
        self,
        path: Union[str, "os.PathLike[str]"],
        *,
        codec: codecs.CodecArg = "cbor",
        durability: str = "full",
        timeout: Optional[float] = 30.0,
        mode: int = 0o600,
    ) -> None:
        if durability not in DURABILITIES:
            raise ValueError(f"`durability` must be 'full' or 'normal', not {durability!r}")
        timeout = check_seconds("timeout", timeout)
        check_int("mode", mode)
        if mode > 0o7777:
            raise ValueError(f"`mode` must be permission bits (at most 0o7777), not {mode:#o}")
        self._codec = codecs.resolve(codec)
        self.path = os.fspath(path)
        if not isinstance(self.path, str):
            raise ValueError(f"`path` must be a str or os.PathLike of str, not {path!r}")
        if not self.path:
            raise ValueError("`path` must name the queue file, not ''")
        if os.path.islink(self.path):
            # SQLite follows the link and keeps -wal/-shm beside the file it
            # points to: the lock file, and the WAL we fsync, must be there too.
            self.path = os.path.realpath(self.path)
        else:
            # The lock file and the connection after a fork are opened later:
            # a relative path would then name files in whatever directory the
            # process has moved to (another lock: no exclusion at all).
            self.path = os.path.abspath(self.path)
        self.durability = durability
        self._storage = Storage(self.path, durability=durability, timeout=timeout, mode=mode)
        self._due_check_at = 0.0  # see DUE_CHECK_INTERVAL

    # -- writing ---------------------------------------------------------

    def write(self, msg: Any) -> int:
        """Append one message and return its seqno.

        Raises:
            EncodeError: the codec cannot encode ``msg``; nothing was written.
            LockTimeoutError: the writer lock stayed taken for ``timeout``.
            StorageFullError: the disk is full; nothing was written.
            QueueClosedError: the queue was closed.
        """
        if self._storage._closed:  # before the message's own errors (SPEC §1)
            raise self._storage.closed_error()
        body = codecs.encode(self._codec, msg)
        # partial, not a lambda: one Python frame less on the hottest path.
        return self._storage.write(functools.partial(self._append_one, body), may_raise=False, appends=True)

    def write_many(self, msgs: Iterable[Any]) -> List[int]:
        """Append all messages in one transaction, all or none.

        Args:
            msgs: any iterable of messages (an empty one writes nothing).

        Returns their seqnos, consecutive.

        Raises:
            EncodeError: the codec cannot encode one of them; none was written.
            LockTimeoutError, StorageFullError, QueueClosedError: as ``write``.
        """
        if self._storage._closed:
            raise self._storage.closed_error()
        bodies = codecs.encode_many(self._codec, msgs)
        if not bodies:
            return []
        return self._storage.write(lambda conn: self._append(conn, bodies), may_raise=False, appends=True)

    def _append(self, conn: apsw.Connection, bodies: List[bytes]) -> List[int]:
        self._promote_due_in(conn)  # they were due before this write
        return append(conn, bodies)

    def _append_one(self, body: bytes, conn: apsw.Connection) -> int:
        # write()'s short path: the same as _append(conn, [body])[0].
        self._promote_due_in(conn)
        self._storage.cursor.execute(SQL_INSERT, (body,))
        return conn.last_insert_rowid()

    def _promote_due_in(self, conn: apsw.Connection, *, now_anyway: bool = False) -> None:
        """Promote the due scheduled entries inside the caller's write
        transaction, when the earliest due time this process knows of has
        come or DUE_CHECK_INTERVAL has passed (or ``now_anyway``)."""
        now = time.time()
        if now_anyway or now >= self._due_check_at:
            next_due = promote(conn, now)[1]
            limit = now + DUE_CHECK_INTERVAL
            self._due_check_at = limit if next_due is None else min(next_due, limit)

    def schedule(self, msg: Any, *, delay: Optional[float] = None, at: Any = None) -> int:
        """Store ``msg`` now; it becomes a normal message (gets its seqno,
        visible to every consumer) once ``delay`` seconds have passed, or at
        ``at`` (a timezone-aware datetime or epoch seconds).

        Returns the id of the scheduled entry (not a seqno). Due entries are
        promoted, in due order, by the next write of any process, and by any
        consumer that is caught up or waiting (a waiting consumer wakes for
        the due time). Entries survive restarts. A due time already past is
        promoted at once.

        Raises:
            ValueError: neither or both of ``delay``/``at``, a negative delay,
                a naive datetime.
            EncodeError: the codec cannot encode ``msg``; nothing was stored.
            LockTimeoutError, StorageFullError, QueueClosedError: as ``write``.
        """
        if self._storage._closed:
            raise self._storage.closed_error()
        due = due_time(delay, at)
        body = codecs.encode(self._codec, msg)

        def store(conn: apsw.Connection) -> int:
            conn.execute(SQL_SCHEDULE, (due, body))
            entry = conn.last_insert_rowid()
            self._promote_due_in(conn, now_anyway=True)
            return entry

        # The ring wakes waiting consumers of every process, so they cut
        # their wait to this entry's due time.
        return self._storage.write(store)

    def _until_due(self) -> Optional[float]:
        """Seconds until the next scheduled entry is due (<= 0: due now), or None."""
        due = self._storage.read(lambda conn: conn.execute(SQL_NEXT_DUE).fetchall()[0][0])
        return None if due is None else due - time.time()

    def _promote_due(self) -> int:
        """Promote the due scheduled entries (a write transaction); returns how many."""
        return self._storage.write(lambda conn: promote(conn, time.time())[0])

    def _settled(self, fn: Any, *, snapshot: bool = False) -> Any:
        """``fn(conn)`` read after promoting the scheduled entries that are
        due, so figures count them (SPEC §2: a due entry *is* a message).

        One read when none is due (the due check rides in it). A promotion
        that would wait (some writer holds the lock: a figure must not wait
        for another process's write) or fails (lock timeout, read-only
        file) is left to the next writer or consumer: the figures then show
        what is stored.
        """

        def read(conn: apsw.Connection) -> Any:
            return fn(conn), conn.execute(SQL_NEXT_DUE).fetchall()[0][0]

        result, due = self._storage.read(read, snapshot=snapshot)
        if due is None or due > time.time() or self._storage.writer_busy():
            return result
        try:
            self._promote_due()
        except QueueClosedError:
            raise
        except (StaggerError, OSError):
            return result
        return self._storage.read(fn, snapshot=snapshot)

    async def awrite(self, msg: Any) -> int:
        """``write`` for asyncio: the write runs in the loop's default executor.

        Raises as ``write``. If the awaiting task is cancelled the write may
        still complete (its seqno is then lost to the caller, not the message).
        """
        return await aio.run_blocking(self.write, msg)

    async def awrite_many(self, msgs: Iterable[Any]) -> List[int]:
        """``write_many`` for asyncio (see ``awrite``)."""
        return await aio.run_blocking(self.write_many, list(msgs))

    # -- figures ---------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The highest seqno ever assigned, by any process (0 for a new queue).

        Scheduled entries already due are promoted first (they are messages).

        Raises:
            QueueClosedError: the queue was closed.
        """
        return self._settled(last_seq)

    def __len__(self) -> int:
        """Messages currently stored (written and not purged), counting
        scheduled entries already due (promoted first).

        Raises:
            QueueClosedError: the queue was closed.
        """
        return self._settled(lambda conn: conn.execute(SQL_COUNT).fetchall()[0][0])

    def stats(self) -> Dict[str, Any]:
        """Figures of the queue, read in one snapshot.

        Returns a dict with ``last_seq``, ``stored`` (messages stored),
        ``bytes`` (file plus WAL on disk), ``groups`` (name -> the
        ``GroupInfo`` figures as a dict), ``scheduled`` (entries not yet due)
        and ``path``. It is JSON-serialisable (``stagger-sqlite info --json``).
        Scheduled entries already due are promoted first.

        Raises:
            QueueClosedError: the queue was closed.
        """

        local = groups_.local_finishes(self.path)

        def figures(conn: apsw.Connection) -> Dict[str, Any]:
            return {
                "path": self.path,
                "last_seq": last_seq(conn),
                "stored": conn.execute(SQL_COUNT).fetchall()[0][0],
                "scheduled": conn.execute("SELECT count(*) FROM scheduled").fetchall()[0][0],
                "groups": {
                    name: dataclasses.asdict(info) for name, info in groups_.group_figures(conn, local).items()
                },
            }

        result = self._settled(figures, snapshot=True)
        result["bytes"] = schema.file_bytes(self.path)
        return result

    # -- consuming -------------------------------------------------------

    def consume(
        self,
        ack: int = 0,
        *,
        batch: int = 50,
        purge: Optional[int] = None,
        wait: Union[bool, float] = True,
        group: Optional[str] = None,
        lease: float = 30.0,
        max_attempts: int = 5,
    ) -> Union[Consumer, "groups_.GroupConsumer"]:
        """Iterate ``(seq, msg)`` for every stored message with ``seq > ack``,
        or, with ``group``, as one member of that consumer group.

        Args:
            ack: the last seqno the caller has finished; delivery starts after
                it. With ``group``: the start point of a new group (ignored
                for an existing one).
            batch: rows read (with ``group``: messages claimed) per round trip.
            purge: before the first message, remove messages with
                ``seq <= min(purge, ack)`` (with ``group``: ``seq <= purge``),
                never beyond what every group has finished.
            wait: ``True``: when caught up, wait for new writes (and, with
                ``group``, redeliveries falling due); ``False``: stop when
                caught up; a number: stop after that many seconds without one.
            group: the consumer group's name (see ``groups.GroupConsumer``).
            lease: with ``group``: seconds a member may hold a message before
                it is delivered to another member.
            max_attempts: with ``group``: failed deliveries before a message
                goes to the group's dead letters.

        Raises:
            ValueError: a negative or non-integer ``ack``/``purge``, ``batch`` < 1,
                a bad ``wait``, ``group``, ``lease`` or ``max_attempts``.
            AckOutOfRangeError: ``ack`` is beyond ``last_seq`` (with ``group``
                too, even for an existing group whose ``ack`` is ignored).
            QueueClosedError: the queue was closed.
        """
        consumer = self._consumer(ack, batch, purge, wait, group, lease, max_attempts)
        consumer._begin()
        return consumer

    def _consumer(
        self, ack: int, batch: int, purge: Optional[int], wait: Union[bool, float],
        group: Optional[str], lease: float, max_attempts: int,
    ) -> Union[Consumer, "groups_.GroupConsumer"]:
        """The consumer ``consume`` returns, its arguments checked (reads
        only), before ``_begin`` makes its writes."""
        if self._storage._closed:
            raise self._storage.closed_error()
        if group is not None:
            if isinstance(ack, int) and not isinstance(ack, bool) and ack > 0:
                # SPEC §3 for every consume: `ack` is ignored for an existing
                # group, but a claim to have processed a message never
                # written is still refused (last_seq never decreases).
                last = self._storage.read(last_seq)
                if ack > last:
                    raise AckOutOfRangeError(
                        f"ack={ack} is beyond the last seqno ever written to {self.path} ({last}): "
                        "that message was never written"
                    )
            return groups_.GroupConsumer(
                self, group, ack=ack, batch=batch, lease=lease, max_attempts=max_attempts, wait=wait, purge=purge
            )
        return Consumer(self, ack=ack, batch=batch, purge=purge, wait=wait)

    def groups(self) -> Dict[str, "groups_.GroupInfo"]:
        """Every consumer group of this queue: name -> ``GroupInfo``.

        Raises:
            QueueClosedError: the queue was closed.
        """
        local = groups_.local_finishes(self.path)
        return self._storage.read(lambda conn: groups_.group_figures(conn, local), snapshot=True)

    def dead_letters(self, group: str) -> List["groups_.DeadLetter"]:
        """The dead letters of ``group``, by seq (empty for an unknown group).

        Returns ``DeadLetter`` values (``seq``, ``msg``, ``attempts``,
        ``error``); ``msg`` is None when the stored bytes cannot be decoded.

        Raises:
            ValueError: ``group`` is not a non-empty string.
            QueueClosedError: the queue was closed.
        """
        return groups_.dead_letters(self, group)

    def requeue(self, group: str, seqs: Optional[Sequence[int]] = None) -> int:
        """Give dead letters of ``group`` (all, or those in ``seqs``) back to
        the group for delivery now, attempts reset. Returns how many.

        Args:
            group: the consumer group.
            seqs: the dead letters' seqnos (None: all); seqnos that are not
                dead letters of the group are skipped.

        Raises:
            ValueError: ``group`` is not a non-empty string, or a bad seq.
            LockTimeoutError, StorageFullError, QueueClosedError: as ``write``.
        """
        return groups_.requeue(self, group, seqs)

    def pause(self, group: str) -> None:
        """Pause consumer group ``group``: from each member's next claim, in
        every process, nothing more is handed out (a waiting member keeps
        waiting; one with ``wait=False`` stops); what is in hand is finished
        normally, and a member working through a claimed batch releases the
        rest at its next lease renewal (within ``lease / 10`` seconds). The
        flag is kept in the file: it holds across restarts until ``resume``.
        A group may be paused before it exists. Idempotent.

        Raises:
            ValueError: ``group`` is not a non-empty string.
        """
        groups_.set_paused(self, group, True)

    def resume(self, group: str) -> None:
        """Undo ``pause``: waiting members of ``group`` wake and claim at
        once. Idempotent.

        Raises:
            ValueError: ``group`` is not a non-empty string.
        """
        groups_.set_paused(self, group, False)

    def drop_group(self, group: str) -> bool:
        """Delete consumer group ``group``: its position, what it has in
        flight or waiting for a retry, its dead letters, its pause flag and
        rate limit. ``purge`` then no longer waits for it. Returns True if
        the group existed.

        A live member of the dropped group ends at its next claim or lease
        renewal (its loop stops quietly; ``next_batch`` returns ``[]``; its
        ``dropped`` is True) and never creates the group again; its ``ack``
        and ``nack`` return False. A later ``consume(group=...)`` of the same
        name creates a new group, as if for the first time.

        Raises:
            ValueError: ``group`` is not a non-empty string.
        """
        return groups_.drop_group(self, group)

    def aconsume(
        self,
        ack: int = 0,
        *,
        batch: int = 50,
        purge: Optional[int] = None,
        wait: Union[bool, float] = True,
        group: Optional[str] = None,
        lease: float = 30.0,
        max_attempts: int = 5,
    ) -> "aio.AsyncConsumer":
        """``consume`` for asyncio: ``async for seq, msg in q.aconsume(...)``.

        Same arguments, semantics and errors as ``consume`` (it builds the
        same consumer, so argument errors raise here, not at the first
        ``await``); waiting never blocks the event loop, and cancelling the
        task that iterates leaves the queue (and the consumer) usable. Use it
        as ``async with`` to close it (a group member: as ``with``).

        Raises:
            ValueError, AckOutOfRangeError, QueueClosedError: as ``consume``.
        """
        return aio.AsyncConsumer(self._consumer(ack, batch, purge, wait, group, lease, max_attempts))

    def read_page(self, after: int, limit: int) -> List[tuple]:
        """Stored ``(seq, body)`` rows with ``seq > after``, ascending, at most
        ``limit``; the read transaction ends before this returns. With
        durability "full" the rows are on disk when it returns.

        Raises:
            QueueClosedError: the queue was closed.
            StaggerError: the fsync that was to make them durable failed.
        """
        def page(conn: apsw.Connection) -> List[tuple]:
            rows = conn.execute(SQL_PAGE, (after, limit)).fetchall()
            schema.check_run(conn, self.path, after, rows)
            return rows

        rows = self._storage.read(page)
        if rows:
            # durability="full": never hand out what a power cut could take back.
            self._storage.ensure_durable(rows[-1][0])
        return rows

    def decode(self, body: bytes, seq: int) -> Any:
        """Decode the stored bytes of message ``seq`` with this queue's codec.

        Raises:
            DecodeError: naming ``seq`` and the path.
        """
        return codecs.decode(self._codec, body, seq, self.path)

    # -- purging ---------------------------------------------------------

    def purge(self, upto: Optional[int] = None) -> int:
        """Remove stored messages with ``seq <= upto`` (None: all), but never
        one some consumer group has not finished, and return how many were
        removed. Free pages go back to the OS incrementally.

        Raises:
            ValueError: ``upto`` is negative or not an integer.
            LockTimeoutError, QueueClosedError: as ``write``.
        """
        if self._storage._closed:
            raise self._storage.closed_error()
        if upto is not None:
            upto = check_bound("upto", upto)

        def remove(conn: apsw.Connection) -> int:
            self._promote_due_in(conn, now_anyway=True)  # a due entry is a message: purged like one
            bound = last_seq(conn) if upto is None else upto
            floor = groups_.finished_floor(conn)
            if floor is not None:
                bound = min(bound, floor)  # never what some group has not finished
            conn.execute(SQL_PURGE, (bound,))
            removed = conn.changes()
            if removed:
                reclaim(conn)
            return removed

        return self._storage.write(remove, notify=False)

    # -- lifetime --------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._storage.closed

    def close(self) -> None:
        """Close the queue. Idempotent; consumers waiting on it end quietly."""
        self._storage.close()

    def __enter__(self) -> "StaggerQueue":
        if self.closed:
            raise self._storage.closed_error()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.durability
        return f"<StaggerQueue {self.path!r} {state}>"
