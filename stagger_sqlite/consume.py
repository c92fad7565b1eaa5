"""Consumer: read a queue after an ack point (Stagger semantics).

The caller owns its ack point: the consumer yields ``(seq, msg)`` for every
stored message with ``seq > ack`` and remembers nothing in the file. Rows are
read ``batch`` at a time in a transaction that ends before the first of them
is handed out, so a consumer holding a message never keeps the WAL from being
checkpointed or a writer from committing.
"""

from __future__ import annotations

import abc
import collections
import time
from typing import TYPE_CHECKING, Any, Deque, Iterator, Optional, Tuple, Union

from .errors import AckOutOfRangeError, LockTimeoutError, QueueClosedError, StorageFullError
from .validate import check_bound, check_int, check_wait
from .wakeup import Waiter

#: Seconds before a consumer that could not promote due scheduled entries
#: (no write access) looks again.
PROMOTE_RETRY = 1.0

if TYPE_CHECKING:  # consume is handed its queue; no import cycle at run time
    from .queue import StaggerQueue


class Consumer(metaclass=abc.ABCMeta):
    """Iterator of ``(seq, msg)`` after an ack point; also a context manager.

    Built by :meth:`StaggerQueue.consume`. One consumer belongs to one thread.
    SPEC §3 types every ``consume`` result as a ``Consumer``: a group member
    (``groups.GroupConsumer``) is registered as a virtual subclass (in the
    package's ``__init__``), so ``isinstance(q.consume(group=...), Consumer)``
    holds too.
    It ends (StopIteration) when caught up with ``wait=False``, after ``wait``
    idle seconds, when closed, or when its queue is closed (quietly, even from
    another thread while it waits).

    ``position`` is the seqno of the last message handed out (initially
    ``ack``): store it as your ack point.
    """

    def __init__(
        self,
        queue: "StaggerQueue",
        *,
        ack: int,
        batch: int,
        purge: Optional[int],
        wait: Union[bool, float],
    ) -> None:
        check_int("ack", ack, maximum=None)  # beyond last_seq: AckOutOfRangeError
        batch = check_bound("batch", batch, 1)
        if purge is not None:
            purge = check_bound("purge", purge)
        self._wait = check_wait(wait)
        self._queue = queue
        self._storage = queue._storage
        self._loads = queue._codec.loads
        self._batch = batch
        self.position = ack
        self._rows: Deque[Tuple[int, bytes]] = collections.deque()
        self._closed = False
        self._idle_deadline: Optional[float] = None
        last = queue.last_seq  # also refuses a closed queue
        if ack > last:
            raise AckOutOfRangeError(
                f"ack={ack} is beyond the last seqno ever written to {queue.path} ({last}): "
                "that message was never written"
            )
        self._purge = None if purge is None else min(purge, ack)
        self._waiter = Waiter(queue._storage)

    def _begin(self) -> None:
        """The write that comes with making the consumer, the purge (run by
        ``consume`` at once, by ``aconsume`` where it cannot block the loop)."""
        if self._purge is not None:
            self._queue.purge(self._purge)

    def __iter__(self) -> Iterator[Tuple[int, Any]]:
        return self

    def __next__(self) -> Tuple[int, Any]:
        """The next ``(seq, msg)``.

        Raises:
            DecodeError: the message cannot be decoded (it names the seqno;
                the consumer has moved past it).
            StopIteration: see the class docstring.
        """
        # Fast path, a message already read: this runs once per message, so
        # it skips the layers (codec wrapper, properties) the slow path uses.
        if self._rows and not self._closed and not self._storage.closed:
            seq, body = self._rows.popleft()
            self.position = seq
            try:
                return seq, self._loads(body)
            except Exception:
                return seq, self._queue.decode(body, seq)  # raises DecodeError naming seq
        while True:
            if self._closed or self._queue.closed:
                raise StopIteration
            if self._rows:
                seq, body = self._rows.popleft()
                self.position = seq
                return seq, self._queue.decode(body, seq)
            try:
                rows = self._queue.read_page(self.position, self._batch)
                if rows:
                    self._rows.extend(rows)
                    self._idle_deadline = None
                    self._waiter.reset()
                    continue
                # Caught up. Scheduled messages that are due become messages
                # now (no daemon does it); the wait below is cut to the next
                # due time.
                until_due = self._queue._until_due()
                if until_due is not None and until_due <= 0:
                    if self._promote():
                        continue
                    until_due = PROMOTE_RETRY
            except QueueClosedError:  # closed by another thread just now
                raise StopIteration from None
            if self._wait is False:
                raise StopIteration
            remaining: Optional[float] = None
            if self._wait is not True:
                # Kept on the consumer, not in this frame: under asyncio this
                # call ends (WouldWait) at every wait and is called again.
                now = time.monotonic()
                if self._idle_deadline is None:
                    self._idle_deadline = now + self._wait
                remaining = self._idle_deadline - now
                if remaining <= 0:
                    raise StopIteration
            if until_due is not None:
                remaining = until_due if remaining is None else min(remaining, until_due)
            if not self._waiter.wait(remaining):
                raise StopIteration

    def _promote(self) -> bool:
        """Promote due scheduled entries; False when this process cannot
        write the file (read-only, disk full, lock held too long): consuming
        goes on, and a writer or another consumer will promote them."""
        try:
            self._queue._promote_due()
        except (PermissionError, LockTimeoutError, StorageFullError):
            return False
        return True

    def close(self) -> None:
        """Stop the consumer; later ``next()`` calls raise StopIteration. Idempotent."""
        self._closed = True
        self._rows.clear()
        self._waiter.close()

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
