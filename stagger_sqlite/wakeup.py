"""Waiting for "something was written", across processes.

Writers ring after each commit (``WriterLock.ring``); a consumer that has
caught up waits here until a ring, the queue's close, or its deadline.

This first version polls with a short, growing interval: correct with any
number of processes, but neither instant nor free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .storage import Storage

MIN_POLL = 0.001
MAX_POLL = 0.05


class Waiter:
    """One consumer's wait for writes. Not shared between threads."""

    def __init__(self, storage: "Storage") -> None:
        self._closed = storage.closed_event
        self._pause = MIN_POLL

    def reset(self) -> None:
        """Something arrived: poll eagerly again."""
        self._pause = MIN_POLL

    def wait(self, timeout: Optional[float]) -> bool:
        """Sleep until something may have changed or ``timeout`` passed.

        Returns False when the queue was closed (the consumer should stop).
        """
        pause = self._pause if timeout is None else min(self._pause, max(timeout, 0.0))
        self._pause = min(self._pause * 2, MAX_POLL)
        return not self._closed.wait(pause)

    def close(self) -> None:
        pass
