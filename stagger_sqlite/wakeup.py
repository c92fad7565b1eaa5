"""Waiting for "something was written", across processes.

Writers ring after each commit that brings news (``WriterLock.release``
rewrites one byte of ``<path>.lock``). A consumer that has caught up waits here until a ring, the
queue's close, or its deadline.

How (Linux): one inotify instance per process watches the lock files that
someone in the process waits on, read by one daemon thread (the *hub*). Each
watched file has a *channel* with a generation counter; the hub bumps it for
every batch of ring events and wakes the channel's waiters (threads on a
condition variable, asyncio tasks through ``call_soon_threadsafe``). A waiter
remembers the generation it last saw, taken *before* the consumer's catch-up
read, so a ring that lands between that read and the wait is never missed.

Why one hub per process and not an inotify instance per waiter: Linux allows
128 inotify instances per user by default; a process with many consumers (or a
machine with many consumer processes) would run out. Why a thread and not a
poll loop: an idle waiter then costs nothing at all (the hub sleeps in
``read(2)``), and a ring reaches the consumer in about 0.1 ms.

Safety nets: a waiter never sleeps longer than ``SAFETY_POLL`` seconds without
letting its consumer look again (a ring lost to a full disk, a lock file
replaced under us, a writer on another host of a network file system). Where
inotify is missing (not Linux, no instance left, or ``STAGGER_SQLITE_WAKEUP=poll``
in the environment) the waiter polls with a short, growing pause instead:
correct, but neither instant nor free.

Closing a queue (``Storage.closed_event``, a :class:`CloseEvent`) wakes every
waiter of the process at once, so ``close()`` from another thread ends a
waiting consumer promptly.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import struct
import threading
import time
import weakref
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Set

from . import inotify
from .lock import LISTENER_BYTE, SLICE

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from .storage import Storage

#: Longest a waiter sleeps without letting its consumer look at the file again,
#: even when no ring came (the safety net of the inotify path).
SAFETY_POLL = 1.0

#: A writer whose last look found no consumer does not look again (nor
#: ring) for SLICE seconds (``WriterLock.release``): a consumer that has
#: just started listening looks again itself once that has passed, and only
#: then trusts rings alone.
LISTEN_GRACE = 2 * SLICE

#: The pure-poll fallback: first and longest pause between two looks.
MIN_POLL = 0.001
MAX_POLL = 0.05



# -- the close signal ------------------------------------------------------


class CloseEvent(threading.Event):
    """``Storage.closed_event``: a ``threading.Event`` whose ``set()`` also
    wakes every waiter of the process (sync and async), so they can see it."""

    def set(self) -> None:
        super().set()
        hub = _HUB
        if hub is not None:
            hub.wake_all()


# -- the non-blocking mode used by asyncio -----------------------------------


class WouldWait(Exception):
    """Raised by :meth:`Waiter.wait` instead of blocking, inside
    :func:`nonblocking`: the asyncio layer then awaits ``waiter.wait_async``."""

    def __init__(self, waiter: "Waiter", timeout: Optional[float]) -> None:
        super().__init__("would wait")
        self.waiter = waiter
        self.timeout = timeout


_local = threading.local()


@contextlib.contextmanager
def nonblocking() -> Iterator[None]:
    """Within this block (this thread only), ``Waiter.wait`` raises
    :class:`WouldWait` rather than blocking. Lets any consumer built on a
    ``Waiter`` be driven by an event loop without a thread of its own."""
    before = getattr(_local, "nonblocking", False)
    _local.nonblocking = True
    try:
        yield
    finally:
        _local.nonblocking = before


class _Channel:
    """The waiters of one watched lock file (one inotify watch) in this process."""

    def __init__(self, wd: int, lock: "threading.RLock") -> None:
        self.wd = wd
        self.generation = 0
        self.refs = 0
        self.alive = True
        self.cond = threading.Condition(lock)
        self.listeners: Set[Callable[[], None]] = set()


class _Hub:
    """The process's inotify instance and the thread that reads it."""

    def __init__(self, libc: ctypes.CDLL) -> None:
        fd = inotify.init(libc)
        self.libc = libc
        self.fd = fd
        self.pid = os.getpid()
        # Reentrant: a GC pass may run a finalizer (a consumer's close(), a
        # queue's close() that wakes everyone) in a thread that holds it.
        self.lock = threading.RLock()
        self.channels: Dict[int, _Channel] = {}
        self.released: List[_Channel] = []
        self.thread = threading.Thread(target=self._run, name="stagger-sqlite-wakeup", daemon=True)
        self.thread.start()

    def attach(self, path: str) -> Optional[_Channel]:
        """A counted reference to the channel of ``path`` (None: cannot watch it)."""
        with self.lock:
            self._drain()
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(path), inotify.IN_MODIFY)
            if wd < 0:
                return None
            ch = self.channels.get(wd)
            if ch is None:
                ch = self.channels[wd] = _Channel(wd, self.lock)
            ch.refs += 1
            return ch

    def release(self, ch: _Channel) -> None:
        """Give back a reference taken by ``attach``.

        Never takes the lock: this runs from finalizers, which a GC pass may
        start in a thread that holds it. The watch is removed at the next
        ``attach`` or event, by :meth:`_drain`.
        """
        if self.pid == os.getpid():  # an inherited hub: leave its state alone
            self.released.append(ch)  # list.append is atomic

    def _drain(self) -> None:
        """Apply the pending releases. The caller holds the lock."""
        while self.released:
            ch = self.released.pop()
            ch.refs -= 1
            if ch.refs == 0 and ch.alive and self.channels.get(ch.wd) is ch:
                del self.channels[ch.wd]
                ch.alive = False
                self.libc.inotify_rm_watch(self.fd, ch.wd)

    def wake_all(self) -> None:
        """Wake every waiter of every channel (a queue was closed)."""
        with self.lock:
            channels = list(self.channels.values())
            for ch in channels:
                ch.cond.notify_all()
            listeners = [fn for ch in channels for fn in ch.listeners]
        for fn in listeners:
            fn()

    def _run(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                continue
            except OSError:  # the fd was closed (after fork in a child): stop
                return
            try:
                self._dispatch(data)
            except Exception:  # pragma: no cover - never let the thread die
                # Waiters would fall back on their 1 s safety poll; keep going.
                continue

    def _dispatch(self, data: bytes) -> None:
        rung: Set[int] = set()
        gone: Set[int] = set()
        overflow = False
        offset = 0
        while offset + inotify.EVENT.size <= len(data):
            wd, mask, _cookie, length = inotify.EVENT.unpack_from(data, offset)
            offset += inotify.EVENT.size + length
            if mask & inotify.IN_Q_OVERFLOW:
                overflow = True
            elif mask & inotify.IN_IGNORED:
                gone.add(wd)  # file deleted or watch removed: re-attach later
            else:
                rung.add(wd)
        listeners = []
        with self.lock:
            self._drain()
            targets = list(self.channels.values()) if overflow else [self.channels[w] for w in rung | gone if w in self.channels]
            for ch in targets:
                ch.generation += 1
                ch.cond.notify_all()
                listeners.extend(ch.listeners)
                if ch.wd in gone:
                    ch.alive = False
                    del self.channels[ch.wd]
        for fn in listeners:
            fn()


_HUB: Optional[_Hub] = None
_HUB_LOCK = threading.Lock()
_HUB_FAILED = False


def _hub() -> Optional[_Hub]:
    """The process's hub, started on first use; None where inotify is missing."""
    global _HUB, _HUB_FAILED
    hub = _HUB
    if hub is not None or _HUB_FAILED:
        return hub
    with _HUB_LOCK:
        if _HUB is None and not _HUB_FAILED:
            libc = inotify.libc()
            if libc is None:
                _HUB_FAILED = True
            else:
                try:
                    _HUB = _Hub(libc)
                except OSError:
                    # EMFILE (no inotify instance left) is the likely cause;
                    # try again for the next consumer rather than giving up.
                    return None
        return _HUB


def _forget_hub_in_child() -> None:
    # The hub thread did not survive the fork; its lock may be held forever.
    global _HUB, _HUB_LOCK
    hub, _HUB = _HUB, None
    _HUB_LOCK = threading.Lock()
    if hub is not None:
        with contextlib.suppress(OSError):
            os.close(hub.fd)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_hub_in_child)


# -- listening: telling writers that some consumer exists ----------------------

#: Lock files this process listens on: path -> [descriptor, inode, consumers].
_LISTENING: Dict[str, List[int]] = {}
_LISTENING_LOCK = threading.Lock()
_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", None)
#: ``struct flock`` (Linux): a shared lock on LISTENER_BYTE.
_LISTEN_LOCK = struct.pack("hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, LISTENER_BYTE, 1, 0) if _OFD_SETLK else b""


def listen(path: str, more: int = 1) -> bool:
    """Count ``more`` consumers of the queue whose lock file is ``path``;
    while there is one, this process holds a shared OFD lock on
    ``LISTENER_BYTE`` of it, and writers ring for news (lock.py). Returns
    False when it cannot (no such file yet, no OFD locks: not Linux; writers
    then ring anyway where they cannot see listeners). With ``more=0`` it
    only re-takes the lock if the lock file was replaced."""
    if _OFD_SETLK is None:  # pragma: no cover - not Linux: writers always ring
        return False
    with _LISTENING_LOCK:
        entry = _LISTENING.get(path)
        if entry is None and not more:
            return False
        try:
            ino = os.stat(path).st_ino
        except OSError:
            return False
        if entry is not None and entry[1] == ino:
            entry[2] += more
            return True
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return False
        try:
            fcntl.fcntl(fd, _OFD_SETLK, _LISTEN_LOCK)
        except OSError:
            os.close(fd)
            return False
        refs = more
        if entry is not None:  # the file was replaced: listen on the new one
            refs += entry[2]
            with contextlib.suppress(OSError):
                os.close(entry[0])
        _LISTENING[path] = [fd, ino, refs]
        return True


def unlisten(path: str, pid: Optional[int] = None) -> None:
    """One consumer fewer (``listen``); the last one releases the lock.
    ``pid``: the process that counted it (a fork child's counts start anew,
    so a count its parent made is not the child's to take back)."""
    if pid is not None and pid != os.getpid():
        return
    with _LISTENING_LOCK:
        entry = _LISTENING.get(path)
        if entry is None:
            return
        entry[2] -= 1
        if entry[2] <= 0:
            del _LISTENING[path]
            with contextlib.suppress(OSError):
                os.close(entry[0])


def _forget_listening_in_child() -> None:
    # The child's consumers are not the parent's: close the inherited
    # descriptors (the parent's own keep its locks) and start counting anew.
    global _LISTENING_LOCK
    _LISTENING_LOCK = threading.Lock()
    for fd, _ino, _refs in _LISTENING.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _LISTENING.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_listening_in_child)


def mechanism() -> str:
    """``"inotify"`` when waiters of this process are woken by rings, else ``"poll"``."""
    return "inotify" if _hub() is not None else "poll"


# -- the waiter ----------------------------------------------------------------


class Waiter:
    """One consumer's wait for writes to its queue file. Not shared between threads.

    Protocol: make the Waiter before the consumer's first catch-up read; after
    a read that found nothing, call :meth:`wait`. Any ring since the previous
    ``wait`` returned (or since construction) makes ``wait`` return at once.
    """

    def __init__(self, storage: "Storage") -> None:
        self._closed = storage.closed_event
        self._path = storage.lock_path
        self._pause = MIN_POLL
        self._hub: Optional[_Hub] = None
        self._channel: Optional[_Channel] = None
        self._seen = 0
        self._finalizer: Optional[weakref.finalize] = None
        # Before the consumer's catch-up read: a writer that commits after
        # that read sees us listening, and rings (once LISTEN_GRACE passed).
        self._listening: Optional[weakref.finalize] = None
        self._grace_until = 0.0
        #: Set by close(): a wait in progress (sync or async) ends at once.
        self._stopped = False
        self._wake_async: Optional[Callable[[], None]] = None  # the async wait in progress
        self._listen()
        self._attach()

    def _listen(self, recheck: bool = False) -> None:
        """Count this consumer in ``listen`` unless it is already counted
        in this process; ``recheck``: also re-take the lock if the lock file
        was replaced (one stat; not at every wait of the poll fallback)."""
        fin = self._listening
        if fin is not None and fin.alive and fin.peek()[2][1] != os.getpid():  # type: ignore[index]
            fin.detach()  # counted by the parent before a fork: count anew here
            fin = None
        if fin is None or not fin.alive:
            if listen(self._path):
                self._listening = weakref.finalize(self, unlisten, self._path, os.getpid())
                self._grace_until = time.monotonic() + LISTEN_GRACE
        elif recheck:
            listen(self._path, 0)
            self._grace_until = time.monotonic() + LISTEN_GRACE

    def _limit(self, timeout: Optional[float]) -> float:
        """How long the next wait may sleep: ``timeout``, the safety poll,
        and, just after we started listening, the end of LISTEN_GRACE."""
        limit = SAFETY_POLL if timeout is None else max(0.0, min(timeout, SAFETY_POLL))
        if self._grace_until:
            left = self._grace_until - time.monotonic()
            if left > 0:
                return min(limit, left)
            self._grace_until = 0.0
        return limit

    def _attach(self) -> Optional[_Channel]:
        """The channel to wait on (None: poll), re-made after a fork or once
        the lock file was replaced."""
        ch, hub = self._channel, self._hub
        if ch is not None and ch.alive and hub is _HUB and hub is not None and hub.pid == os.getpid():
            return ch
        self._detach()
        hub = _hub()
        self._listen(recheck=hub is not None)  # re-attaching: the lock file may be new
        if hub is None:
            return None
        if not os.path.exists(self._path):
            return None
        ch = hub.attach(self._path)
        if ch is None:  # no such file any more, or no watch left (ENOSPC)
            return None
        self._hub, self._channel = hub, ch
        with hub.lock:
            self._seen = ch.generation
        self._finalizer = weakref.finalize(self, hub.release, ch)
        return ch

    def _detach(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._finalizer = None
        self._hub = self._channel = None

    def reset(self) -> None:
        """Something arrived: the poll fallback looks eagerly again."""
        self._pause = MIN_POLL

    def wait(self, timeout: Optional[float]) -> bool:
        """Sleep until a ring since the last wait, the queue's close, or
        ``timeout`` seconds (None: no limit but the safety poll).

        Returns False when the queue or this Waiter was closed (the consumer
        should stop); True otherwise, including spurious wake-ups: the caller
        looks again.

        Raises:
            WouldWait: inside :func:`nonblocking`, instead of sleeping.
        """
        if self._closed.is_set() or self._stopped:
            return False
        before = self._channel
        ch = self._attach()
        if ch is None:
            return self._poll_wait(timeout)
        if ch is not before:
            return True  # watching anew (after a fork, a replaced file): look first
        hub = self._hub
        assert hub is not None
        limit = self._limit(timeout)
        with hub.lock:
            if ch.generation != self._seen:
                self._seen = ch.generation
                return True
            if getattr(_local, "nonblocking", False):
                raise WouldWait(self, timeout)
            if not self._closed.is_set() and not self._stopped:  # close() notifies under hub.lock
                ch.cond.wait(limit)
            self._seen = ch.generation
        return not (self._closed.is_set() or self._stopped)

    def _poll_wait(self, timeout: Optional[float]) -> bool:
        if getattr(_local, "nonblocking", False):
            raise WouldWait(self, timeout)
        pause = self._next_pause(timeout)
        return not self._closed.wait(pause) and not self._stopped

    def _next_pause(self, timeout: Optional[float]) -> float:
        pause = self._pause if timeout is None else min(self._pause, max(timeout, 0.0))
        self._pause = min(self._pause * 2, MAX_POLL)
        return pause

    async def wait_async(self, timeout: Optional[float]) -> bool:
        """:meth:`wait` for an event loop: the task sleeps, the loop runs on.

        Cancelling the awaiting task is clean: nothing is left registered.
        """
        if self._closed.is_set() or self._stopped:
            return False
        before = self._channel
        ch = self._attach()
        if ch is None:
            await asyncio.sleep(self._next_pause(timeout))
            return not (self._closed.is_set() or self._stopped)
        if ch is not before:
            return True
        hub = self._hub
        assert hub is not None
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def fire() -> None:
            if not fut.done():
                fut.set_result(None)

        def listener() -> None:  # called in the hub thread (or by close)
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(fire)

        with hub.lock:
            if ch.generation != self._seen:
                self._seen = ch.generation
                return True
            ch.listeners.add(listener)
        limit = self._limit(timeout)
        timer = loop.call_later(limit, fire)
        self._wake_async = listener
        try:
            if not self._closed.is_set() and not self._stopped:
                await fut
        finally:
            self._wake_async = None
            timer.cancel()
            with hub.lock:
                ch.listeners.discard(listener)
        with hub.lock:
            self._seen = ch.generation
        return not (self._closed.is_set() or self._stopped)

    def close(self) -> None:
        """Stop watching and listening (idempotent). A wait in progress, in
        another thread or an awaiting task, returns False at once."""
        self._stopped = True
        wake, hub, ch = self._wake_async, self._hub, self._channel
        if wake is not None:
            wake()
        if hub is not None and ch is not None:
            with hub.lock:
                ch.cond.notify_all()  # other waiters of the channel just look again
        self._detach()
        if self._listening is not None:
            self._listening()
