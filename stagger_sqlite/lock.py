"""The cross-process writer lock: an exclusive flock on ``<path>.lock``.

Every write transaction of every process takes this lock first, so writers
queue here and SQLite's own busy handler (which sleeps in growing steps and
starves waiters, the source of "database is locked") is never what they wait
in. The lock is the one ``filelock.FileLock`` takes (``filelock`` locks the
descriptor for us), so other tools can coordinate with our writers through the
same file.

Why not ``FileLock`` itself: it opens and closes the lock file on every
acquire (about 64 µs, half a durable commit) and a blocked waiter polls every
50 ms. We keep one descriptor open for the life of the queue and hand it to
``filelock.lock_descriptor``; a blocked waiter polls in short steps, or when it
may wait forever, sleeps in the kernel and is woken the moment the lock is
released.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Optional

import filelock

from .errors import LockTimeoutError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: Longest sleep between two attempts of a waiter with a deadline. Short, so a
#: released lock is taken again within about a millisecond.
MAX_POLL = 0.001


def open_lock_file(lock_path: str, mode: int) -> int:
    """Open (creating with exactly ``mode``) the lock file; returns a descriptor."""
    flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(lock_path, flags | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return os.open(lock_path, flags)
    try:
        os.fchmod(fd, mode)  # the creator sets the mode, whatever the umask
    except (AttributeError, OSError):  # pragma: no cover - no fchmod
        pass
    return fd


class WriterLock:
    """An exclusive lock on ``lock_path`` held around each write transaction.

    Not reentrant and not thread-safe: the owning storage serialises its
    threads before they reach it. Must be reopened after ``fork`` (a flock
    belongs to the open file description, which a child shares).
    """

    def __init__(self, lock_path: str, mode: int) -> None:
        self.path = lock_path
        self.fd: Optional[int] = open_lock_file(lock_path, mode)

    def acquire(self, timeout: Optional[float]) -> None:
        """Take the lock, waiting up to ``timeout`` seconds (``None``: forever).

        Raises:
            LockTimeoutError: another writer held it for the whole timeout.
        """
        fd = self._fd()
        if filelock.lock_descriptor(fd, blocking=False):
            return
        if timeout is None and fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the kernel wakes us at release
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.00005
        while True:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LockTimeoutError(
                        f"waited {timeout:g} s for the writer lock {self.path}; nothing was written"
                    )
                pause = min(pause, remaining)
            time.sleep(pause)
            if filelock.lock_descriptor(fd, blocking=False):
                return
            pause = min(pause * 2, MAX_POLL)

    def release(self) -> None:
        filelock.unlock_descriptor(self._fd())

    def ring(self) -> None:
        """Touch the lock file so watchers of it learn that a commit happened.

        One byte rewritten in place: the file's content never matters to the
        lock, and the write is what file-change notifications report.
        """
        try:
            os.pwrite(self._fd(), b"\0", 0)
        except OSError as e:  # a full disk must not fail a write that committed
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def _fd(self) -> int:
        if self.fd is None:
            raise ValueError("writer lock is closed")
        return self.fd
