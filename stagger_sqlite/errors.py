"""The exceptions stagger_sqlite raises.

Every class derives from :class:`StaggerError`; where Python has a standard
meaning for the failure the class derives from that too, so ``except
TimeoutError`` or ``except ValueError`` keep working. This module imports
nothing of ours: every other module may import it.

The line drawn (after trio): :class:`QueueClosedError` means *your* code closed
the queue; :class:`StorageFullError` and :class:`NotAQueueError` mean external
circumstances.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "StaggerError",
    "QueueClosedError",
    "LockTimeoutError",
    "EncodeError",
    "DecodeError",
    "AckOutOfRangeError",
    "NotAQueueError",
    "StorageFullError",
]


class StaggerError(Exception):
    """Base class of every error raised by stagger_sqlite."""


class QueueClosedError(StaggerError):
    """Raised when a queue (or a consumer) is used after your code closed it."""


class LockTimeoutError(StaggerError, TimeoutError):
    """Raised when a write waited ``timeout`` seconds for the writer lock.

    Nothing of that write was stored.
    """


class EncodeError(StaggerError, TypeError):
    """Raised by writes when the codec cannot encode a message.

    Raised before any transaction opens: nothing of the write (or of the whole
    ``write_many`` batch) was stored.
    """


class DecodeError(StaggerError):
    """Raised when a stored message cannot be decoded by the queue's codec.

    ``seq`` is the sequence number of the message that failed.
    """

    def __init__(self, message: str, seq: Optional[int] = None) -> None:
        super().__init__(message)
        self.seq = seq


class AckOutOfRangeError(StaggerError, ValueError):
    """Raised by ``consume`` when ``ack`` is beyond the last seqno ever written.

    The caller claims to have processed a message that was never written,
    which usually means it is pointed at the wrong queue file.
    """


class NotAQueueError(StaggerError):
    """Raised when the path is not a queue this release can open.

    The path is a directory, not a SQLite file, a SQLite file of another
    schema, or a queue of a newer format version. The file is left untouched.
    """


class StorageFullError(StaggerError):
    """Raised when the disk (or a size limit) is full.

    Nothing of the failed write was stored; what was stored before is intact
    and readable, and writes succeed again once space is freed.
    """
