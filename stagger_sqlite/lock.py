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
released. Waiting processes announce themselves on bytes of the lock file
(POSIX record locks, independent of the flock), so that a process writing
back to back hands the lock over instead of starving them
(``WriterLock.acquire``).
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
#: First sleep of a waiter, and the sleep between attempts while the wait is
#: young (the lock is likely changing hands between writers every commit).
MIN_POLL = 0.00005
FAST_POLL = 0.0001
FAST_FOR = 0.05
#: A writer that released the lock less than RECENT seconds ago is writing
#: back to back; once it has done so for SLICE seconds and others wait, it
#: first sleeps COURTESY (longer than a waiter's FAST_POLL, so one of them
#: takes the lock in between).
RECENT = 0.002
SLICE = 0.001
COURTESY = 0.0003
#: Bytes of the lock file that waiters lock (shared) to announce themselves:
#: every waiter on WAITER_BYTE, those waiting for STARVE seconds or more also
#: on STARVING_BYTE (they get the lock first).
WAITER_BYTE = 1
STARVING_BYTE = 2
STARVE = 0.004


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
        self._released_at = -1e9
        self._run_start = 0.0

    def acquire(self, timeout: Optional[float]) -> None:
        """Take the lock, waiting up to ``timeout`` seconds (``None``: forever).

        Fair hand-off: a writer that has been taking the lock back to back for
        ``SLICE`` seconds and finds other processes waiting for it steps aside
        once (it waits its turn like them) instead of taking it straight
        back; otherwise a busy producer would re-take the lock within
        microseconds of each release and the others, which can only notice a
        release by polling, would starve (tens of milliseconds at p99 with 4
        producers). The slice keeps most hand-offs, which leave the lock idle
        for a poll's time, off the path of each commit. Among waiters, those
        that have waited ``STARVE`` seconds go first: the others (and any
        newcomer) leave the lock to them, so no waiter loses round after round.

        Raises:
            LockTimeoutError: another writer held it for the whole timeout.
        """
        fd = self._fd()
        now = time.monotonic()
        if now - self._released_at >= RECENT:
            self._run_start = now  # not back to back: a new run of writes
        courteous = self._others_announce(STARVING_BYTE) or (
            now - self._run_start >= SLICE and self._others_announce(WAITER_BYTE)
        )
        if not courteous and filelock.lock_descriptor(fd, blocking=False):
            return
        self._wait(fd, timeout, first_pause=COURTESY if courteous else MIN_POLL)
        self._run_start = time.monotonic()

    def _wait(self, fd: int, timeout: Optional[float], first_pause: float) -> None:
        """Poll for the lock while announcing ourselves as a waiter.

        With no timeout the kernel wakes us at release. With one, waiters
        poll often (``FAST_POLL``) for the first ``FAST_FOR`` seconds, when the
        lock is being handed round among writers and each hand-off should be
        prompt; a wait longer than that means a long transaction, and polling
        slows down to ``MAX_POLL``.
        """
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        pause = first_pause
        starving = False
        self._announce(WAITER_BYTE, True)
        try:
            if timeout is None and fcntl is not None:
                if first_pause > MIN_POLL:
                    time.sleep(first_pause)  # our courtesy: let a waiter in first
                fcntl.flock(fd, fcntl.LOCK_EX)  # the kernel wakes us at release
                return
            while True:
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise LockTimeoutError(
                            f"waited {timeout:g} s for the writer lock {self.path}; nothing was written"
                        )
                    pause = min(pause, remaining)
                time.sleep(pause)
                waited = time.monotonic() - start
                if not starving and waited >= STARVE:
                    starving = True
                    self._announce(STARVING_BYTE, True)
                if (starving or not self._others_announce(STARVING_BYTE)) and filelock.lock_descriptor(
                    fd, blocking=False
                ):
                    return
                if waited < FAST_FOR:
                    pause = FAST_POLL
                else:
                    pause = min(max(pause, FAST_POLL) * 2, MAX_POLL)
        finally:
            if starving:
                self._announce(STARVING_BYTE, False)
            self._announce(WAITER_BYTE, False)

    def release(self) -> None:
        filelock.unlock_descriptor(self._fd())
        self._released_at = time.monotonic()

    # Waiters announce themselves with a shared POSIX record lock on one byte
    # of the lock file (beyond the byte ring() rewrites). POSIX record locks
    # and flock locks are independent on Linux and the BSDs, so this never
    # touches the writer lock itself; it is only a hint, and if it is lost
    # (POSIX locks drop when the process closes any descriptor of the file)
    # the only cost is a less fair hand-off.

    def _announce(self, byte: int, on: bool) -> None:
        if fcntl is None:  # pragma: no cover - Windows
            return
        try:
            fcntl.lockf(self._fd(), fcntl.LOCK_SH if on else fcntl.LOCK_UN, 1, byte)
        except OSError:
            pass

    def _others_announce(self, byte: int) -> bool:
        """True when another process holds its announcement on ``byte``."""
        if fcntl is None:  # pragma: no cover - Windows
            return False
        fd = self._fd()
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, byte)
        except OSError:
            return True
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, byte)
        return False

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
