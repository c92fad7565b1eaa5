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
``filelock.lock_descriptor``. Each release rewrites one byte of the lock file
(the *ring*): a waiting writer sleeps on it through inotify and wakes about
20 µs after the release, in its own thread, with its timeout still honoured
(a blocking ``flock`` has no timeout). The same ring wakes waiting consumers
(``wakeup.py``). Waiting processes announce themselves on other bytes of the
lock file (POSIX record locks, independent of the flock), so that a process
writing back to back hands the lock over instead of starving them
(``WriterLock.acquire``), and so do processes with consumers (an OFD lock on
``LISTENER_BYTE``): with neither, a release does not ring at all.
"""

from __future__ import annotations

import os
import struct
import sys
import time
from typing import Optional, Tuple

import filelock

from .errors import LockTimeoutError
from .inotify import Bell

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: Longest a waiter sleeps between two attempts when no release rang (the
#: holder is a tool outside stagger_sqlite, or died, or there is no inotify).
MAX_POLL = 0.001
#: The first sleeps of a waiter without inotify, while the lock is likely
#: changing hands between writers every commit.
FAST_POLL = 0.0001
FAST_FOR = 0.05
#: A writer that released the lock less than RECENT seconds ago is writing
#: back to back; once it has done so for SLICE seconds and others wait, it
#: steps aside: it waits for the next release, or COURTESY seconds at most.
RECENT = 0.002
SLICE = 0.001
COURTESY = 0.0003
#: A writer in its slice says in its release ring when it will be back (at
#: most COMEBACK seconds later) and when its slice ends; waiters leave it the
#: lock until then, sleeping on a timer rather than on every ring: handing
#: the lock over costs more (a wake-up, and SQLite re-reading what the other
#: process changed) than a writer's own pause between two writes, and waking
#: every waiter at every commit would take the CPU the holder needs.
COMEBACK = 0.0002
#: Where in the lock file the ring writes those two times: native doubles of
#: ``time.monotonic()``, the same clock in every process of the machine.
SLICE_INFO_AT = 8
_SLICE_INFO = struct.Struct("ddq")  # back by, slice end, pid of the writer
_NO_SLICE = _SLICE_INFO.pack(0.0, 0.0, 0)
#: A writer that waited for the lock, or saw others wait, in the last
#: CONTENDED seconds looks for waiters at every release (no quiet window,
#: see release): under contention a missed ring costs a waiter its MAX_POLL.
CONTENDED = 0.1
#: Bytes of the lock file that waiters lock (shared) to announce themselves:
#: every waiter on WAITER_BYTE, those waiting for STARVE seconds or more also
#: on STARVING_BYTE (they get the lock first).
WAITER_BYTE = 1
STARVING_BYTE = 2
STARVE = 0.004
#: Byte of the lock file on which every process with a consumer of the queue
#: holds a shared open-file-description lock (``wakeup.listen``): a release
#: rings for news only when someone listens. An OFD lock, not a POSIX one,
#: because POSIX locks vanish when the process closes any descriptor of the
#: file (another queue object closing), and a lost announcement would cost
#: the consumer its wake-ups.
LISTENER_BYTE = 3

#: ``waiting()``: nobody, some waiter, a starving waiter.
NOBODY, WAITING, STARVING = 0, 1, 2

#: Linux ``struct flock`` for F_GETLK (l_type, l_whence, l_start, l_len,
#: l_pid): one syscall tests both announcement bytes. Elsewhere the layout
#: differs and two lockf calls a byte do the test.
_FLOCK = struct.Struct("hhqqi4x") if sys.platform.startswith("linux") and fcntl is not None else None
_ANY_WAITER = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, WAITER_BYTE, 2, 0) if _FLOCK is not None else b""
_ANYONE = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, WAITER_BYTE, 3, 0) if _FLOCK is not None else b""


def held(lock_path: str) -> bool:
    """Whether a writer (of any process, this one included) holds the lock
    now, read from the kernel's lock table (/proc/locks): neither taking
    the lock, even for an instant (a writer with ``timeout=0`` would fail),
    nor opening and closing a descriptor of the lock file (which would drop
    this process's waiter announcements, POSIX locks). False where there is
    no such table. For work that may wait for the next writer rather than
    queue for it."""
    try:
        st = os.stat(lock_path)
        with open("/proc/locks", "rb") as f:
            table = f.read()
    except OSError:
        return False
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} ".encode()
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" (a "->" line is a waiter)
        if len(fields) > 5 and fields[1] == b"FLOCK" and fields[5] + b" " == where:
            return True
    return False


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
        #: This holder is writing on and on (back to back, or after a wait):
        #: its release rings announce its slice.
        self._in_run = False
        #: Until when acquire() need not look for waiters (see there).
        self._alone_until = 0.0
        #: When we took the lock, and our last pause between a release and
        #: our next acquire (not counting waits): whether we are lock-bound.
        self._acquired_at = 0.0
        self._gap = float("inf")
        #: Wakes a waiter at the next release; made at the first wait.
        self._bell: Optional[Bell] = None
        self._bell_tried = False
        #: Still announced as a waiter although holding the lock (see _wait).
        self._announced = False
        #: Whether some consumer listened at the last release (see release).
        self.listening = True
        #: Until when a release need not look who waits or listens: the
        #: last look found nobody (see release).
        self._quiet_until = 0.0
        #: Until when we count as contended (CONTENDED): no quiet windows.
        self._contended_until = 0.0
        self._pid = os.getpid()  # a WriterLock never crosses a fork (reopened there)

    def acquire(self, timeout: Optional[float]) -> bool:
        """Take the lock, waiting up to ``timeout`` seconds (``None``: forever).

        Returns True when it had to wait (others held it, or we stepped aside).

        A waiter sleeps until a release rings (``release`` rewrites bytes of
        the lock file and inotify wakes the sleeper in about 20 µs), or
        ``MAX_POLL`` seconds when no ring comes; without inotify it polls.
        It leaves the lock to a writer in its slice (see ``release``).

        Fair hand-off: a writer that has been taking the lock back to back for
        ``SLICE`` seconds and finds other processes waiting for it steps aside
        once (it waits its turn like them) instead of taking it straight
        back; otherwise a busy producer would re-take the lock within
        microseconds of each release and the others would starve. Among
        waiters, those that have waited ``STARVE`` seconds go first: the
        others (and any newcomer) leave the lock to them, so no waiter loses
        round after round.

        Raises:
            LockTimeoutError: another writer held it for the whole timeout.
        """
        fd = self.fd
        if fd is None:
            raise ValueError("writer lock is closed")
        now = time.monotonic()
        self._in_run = now - self._released_at < RECENT
        if not self._in_run:
            self._run_start = now  # not back to back: a new run of writes
        if self._in_run and now < self._alone_until:
            # Nobody waited when we looked, under SLICE ago, and we have
            # written on since: whoever came since waits at most that long
            # to be seen (which is what a slice promises anyway).
            waiting = NOBODY
        else:
            # Waiters only (release's _look also tests for listeners: a
            # syscall more per acquire under contention, for nothing here).
            waiting = self.waiting()
            if waiting == NOBODY:
                self._alone_until = now + SLICE
        courteous = waiting == STARVING or (waiting == WAITING and now - self._run_start >= SLICE)
        if not courteous and filelock.lock_descriptor(fd, blocking=False):
            if self._in_run:
                self._gap = now - self._released_at
            self._acquired_at = now
            return False
        self._wait(fd, timeout, courteous)
        self._acquired_at = self._run_start = time.monotonic()
        self._contended_until = self._acquired_at + CONTENDED
        self._in_run = True  # it had to wait: it contends, and gets its slice
        return True

    def _wait(self, fd: int, timeout: Optional[float], courteous: bool) -> None:
        """Wait for the lock while announcing ourselves as a waiter."""
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        bell = self._ring_bell()
        pause = COURTESY if courteous else (MAX_POLL if bell is not None else FAST_POLL / 2)
        starving = False
        got = False
        self._announce(WAITER_BYTE, True)
        try:
            if bell is None and timeout is None and fcntl is not None:
                if courteous:
                    time.sleep(COURTESY)  # let a waiter in first
                fcntl.flock(fd, fcntl.LOCK_EX)  # the kernel wakes us at release
                got = True
                return
            try_now = not courteous
            while True:
                if bell is not None:
                    bell.clear()  # before the attempt: a release after it wakes us
                on_timer = 0.0  # > 0: sleep that long, not listening for rings
                if try_now:
                    back_by, slice_end = (0.0, 0.0) if starving else self._holder_slice()
                    now = time.monotonic()
                    if now < back_by:
                        on_timer = back_by - now  # the holder is about to write again
                    elif (starving or self.waiting() != STARVING) and filelock.lock_descriptor(fd, blocking=False):
                        got = True
                        return
                    elif now < slice_end:
                        on_timer = slice_end - now  # held within its slice: wait for the slice's end
                try_now = True
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        # Courtesy and slices are hints: time is up, so a
                        # free lock is ours whatever they say.
                        if filelock.lock_descriptor(fd, blocking=False):
                            got = True
                            return
                        raise LockTimeoutError(
                            f"waited {timeout:g} s for the writer lock {self.path}; nothing was written"
                        )
                    pause = min(pause, remaining)
                    on_timer = min(on_timer, remaining)
                if on_timer > 0:
                    time.sleep(min(on_timer, SLICE))
                elif bell is not None:
                    bell.wait(pause)
                    pause = MAX_POLL
                else:
                    time.sleep(pause)
                    waited = time.monotonic() - start
                    pause = FAST_POLL if waited < FAST_FOR else min(max(pause, FAST_POLL) * 2, MAX_POLL)
                if not starving and time.monotonic() - start >= STARVE:
                    starving = True
                    self._announce(STARVING_BYTE, True)
        finally:
            if starving:
                self._announce(STARVING_BYTE, False)
            if got:
                # Withdrawn at release: off the path from hand-off to commit.
                # Holding the lock, we are nobody's competitor meanwhile.
                self._announced = True
            else:
                self._announce(WAITER_BYTE, False)

    def release(self, news: bool = True) -> None:
        """Release the lock and ring: rewrite bytes of the lock file, which
        wakes (inotify IN_MODIFY) the consumers waiting for news and the
        writers waiting for the lock. It rings for ``news`` when some
        consumer listens (``LISTENER_BYTE``; ``self.listening`` says what it
        found), and whenever some writer waits. What it writes is when we
        will be back, if we are in our slice (``COMEBACK``); the lock itself
        never depends on the file's content. A ring is a hint: if it fails (a
        full disk), waiters still look again within their safety poll, and
        the write stands.

        Once a look (one F_GETLK) found nobody at all, the releases of the
        next ``SLICE`` seconds do not look again (a producer without
        consumers, writing back to back, saves a syscall a write), unless
        we waited for the lock or saw waiters in the last ``CONTENDED``
        seconds. Whoever comes meanwhile learns nothing from us until then:
        a new consumer looks again itself after ``wakeup.LISTEN_GRACE``, a
        new waiter within ``MAX_POLL`` (its bell's timeout), once.
        """
        fd = self.fd
        if fd is None:
            raise ValueError("writer lock is closed")
        filelock.unlock_descriptor(fd)
        now = self._released_at = time.monotonic()
        waiting = NOBODY if now < self._quiet_until else self._look(now)
        if waiting or (news and self.listening):
            end = self._run_start + SLICE
            # A slice only for a writer bound by the lock: one that comes back
            # sooner than COMEBACK and than it held the lock. A writer with
            # work between its writes (a group member handling a batch) hands
            # over at once, so that others work while it does.
            bound = self._in_run and self._gap < COMEBACK and self._gap < now - self._acquired_at
            try:
                os.pwrite(fd, _SLICE_INFO.pack(min(end, now + COMEBACK), end, self._pid) if bound and end > now else _NO_SLICE, SLICE_INFO_AT)
            except OSError:
                pass
        if self._announced:
            self._announced = False
            self._announce(WAITER_BYTE, False)

    def _look(self, now: float) -> int:
        """Who waits for the lock (``waiting()``) and whether some consumer
        listens (``self.listening``), at a release: one F_GETLK. When nobody
        waits, acquire need not look again for SLICE; when nobody listens
        either, release need not (see release)."""
        waiting, self.listening = self._who()
        if waiting == NOBODY:
            self._alone_until = now + SLICE
            if not self.listening and now >= self._contended_until:
                self._quiet_until = now + SLICE
        else:
            self._contended_until = now + CONTENDED
        return waiting

    def _holder_slice(self) -> Tuple[float, float]:
        """(back by, slice end) of another process's last ring, or zeros
        (our own ring is never a reason to wait for ourselves)."""
        try:
            data = os.pread(self._fd(), _SLICE_INFO.size, SLICE_INFO_AT)
        except OSError:
            return (0.0, 0.0)
        if len(data) != _SLICE_INFO.size:
            return (0.0, 0.0)
        back_by, end, pid = _SLICE_INFO.unpack(data)
        return (0.0, 0.0) if pid == self._pid else (back_by, end)

    def _ring_bell(self) -> Optional[Bell]:
        if not self._bell_tried:
            self._bell_tried = True
            self._bell = Bell.open(self.path)
        return self._bell

    # Waiters announce themselves with a shared POSIX record lock on one byte
    # of the lock file (beyond the byte release() rewrites). POSIX record
    # locks and flock locks are independent on Linux and the BSDs, so this
    # never touches the writer lock itself; it is only a hint, and if it is
    # lost (POSIX locks drop when the process closes any descriptor of the
    # file) the only cost is a less fair hand-off. A process never sees its
    # own announcements (POSIX locks never conflict within a process).

    def _announce(self, byte: int, on: bool) -> None:
        if fcntl is None:  # pragma: no cover - Windows
            return
        try:
            fcntl.lockf(self._fd(), fcntl.LOCK_SH if on else fcntl.LOCK_UN, 1, byte)
        except OSError:
            pass

    def waiting(self) -> int:
        """Who else waits for the lock: ``NOBODY``, ``WAITING`` or ``STARVING``.

        Asked before every acquire, so on Linux it is one F_GETLK syscall
        while nobody waits."""
        if fcntl is None:  # pragma: no cover - Windows
            return NOBODY
        if _FLOCK is None:  # pragma: no cover - not Linux
            if self._others_announce(STARVING_BYTE):
                return STARVING
            return WAITING if self._others_announce(WAITER_BYTE) else NOBODY
        try:
            answer = fcntl.fcntl(self._fd(), fcntl.F_GETLK, _ANY_WAITER)
        except OSError:  # no POSIX locks here (some network file systems)
            return NOBODY
        return self._waiters_in(answer)

    def _waiters_in(self, answer: bytes) -> int:
        """``waiting()`` from an F_GETLK answer that found nobody or a waiter."""
        kind, _whence, start, length, _pid = _FLOCK.unpack(answer)  # type: ignore[union-attr]
        if kind == fcntl.F_UNLCK:
            return NOBODY
        if start <= STARVING_BYTE and (length == 0 or STARVING_BYTE < start + length):
            return STARVING
        return STARVING if self._test(STARVING_BYTE, 1) is not None else WAITING

    def _who(self) -> Tuple[int, bool]:
        """(``waiting()``, whether some consumer listens): one F_GETLK while
        nobody does either. Where listeners cannot be seen (not Linux, no
        record locks), assume one listens: ring as if."""
        if fcntl is None or _FLOCK is None:  # pragma: no cover - not Linux
            return self.waiting(), True
        try:
            answer = fcntl.fcntl(self._fd(), fcntl.F_GETLK, _ANYONE)
        except OSError:
            return NOBODY, True
        kind, _whence, start, _length, _pid = _FLOCK.unpack(answer)
        if kind == fcntl.F_UNLCK:
            return NOBODY, False
        if start >= LISTENER_BYTE:  # a listener's lock: and waiters?
            return self.waiting(), True
        return self._waiters_in(answer), self._test(LISTENER_BYTE, 1) is not None

    def _test(self, start: int, length: int) -> Optional[tuple]:
        """(start, length) of another process's lock on the range, or None."""
        assert _FLOCK is not None
        query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
        try:
            answer = fcntl.fcntl(self._fd(), fcntl.F_GETLK, query)
        except OSError:
            return None
        kind, _whence, got_start, got_length, _pid = _FLOCK.unpack(answer)
        return None if kind == fcntl.F_UNLCK else (got_start, got_length)

    def _others_announce(self, byte: int) -> bool:
        """True when another process holds its announcement on ``byte``."""
        if fcntl is None:  # pragma: no cover - Windows
            return False
        if _FLOCK is not None:
            return self._test(byte, 1) is not None
        fd = self._fd()
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, byte)
        except OSError:
            return True
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, byte)
        return False

    def close(self) -> None:
        bell, self._bell = self._bell, None
        if bell is not None:
            bell.close()
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def __del__(self) -> None:
        # A queue dropped without close(): its descriptor goes with it, or a
        # loop of StaggerQueue(p).write(x) runs out of descriptors.
        if getattr(self, "fd", None) is not None and self._pid == os.getpid():  # (__init__ may have failed)
            try:
                self.close()
            except Exception:  # at interpreter exit, or a bell already gone
                pass

    def _fd(self) -> int:
        if self.fd is None:
            raise ValueError("writer lock is closed")
        return self.fd
