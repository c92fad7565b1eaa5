"""Linux inotify through libc (ctypes, no dependency): the kernel tells a
sleeping process the moment another one writes to a file.

Two users: the wake-up hub (``wakeup.py``: consumers waiting for new
messages) and the writer lock (``lock.py``: a writer waiting for the lock
sleeps until the holder releases it). Both watch ``<path>.lock``, which every
writer rewrites a few bytes of after each release that brings news, or that
some other writer waits for (``WriterLock.release``).

Absent (not Linux, or ``STAGGER_SQLITE_WAKEUP=poll`` in the environment),
``libc()`` returns None and callers poll instead.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
from typing import Optional

IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
IN_MODIFY = 0x00000002
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
#: select(2)'s limit on descriptor numbers.
FD_SETSIZE = 1024
#: One event: wd, mask, cookie, len (then len bytes of name).
EVENT = struct.Struct("iIII")

_LIBC: Optional[ctypes.CDLL] = None


def libc() -> Optional[ctypes.CDLL]:
    """libc with the inotify calls, or None (where there is none, or where
    ``STAGGER_SQLITE_WAKEUP=poll`` asks for the polling fallback)."""
    global _LIBC
    if os.environ.get("STAGGER_SQLITE_WAKEUP") == "poll":
        return None
    if _LIBC is not None:
        return _LIBC
    # dlopen(NULL) sees the libc Python is linked with; no find_library(),
    # which would run ldconfig in a subprocess.
    for name in (None, "libc.so.6"):
        try:
            lib = ctypes.CDLL(name, use_errno=True)
            lib.inotify_init1  # noqa: B018 - AttributeError where there is none
            lib.inotify_add_watch
            lib.inotify_rm_watch
        except (OSError, AttributeError):
            continue
        lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        _LIBC = lib
        return lib
    return None


def init(lib: ctypes.CDLL, flags: int = IN_CLOEXEC) -> int:
    """A new inotify instance (a descriptor). Raises OSError (EMFILE: the
    user's 128 instances are taken)."""
    fd = lib.inotify_init1(flags)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


class Bell:
    """One file watched for writes by a private, non-blocking inotify
    instance, waited on in the calling thread (no thread hop: the writer that
    rings wakes the sleeper directly, in about 20 µs).

    Not thread-safe. ``open`` returns None where inotify is missing or no
    instance is left; the caller then polls.
    """

    def __init__(self, fd: int) -> None:
        self.fd: Optional[int] = fd
        # select(2) sleeps to the microsecond (poll(2) rounds up to whole
        # milliseconds, too coarse for waits of 0.2 ms) but takes descriptors
        # below FD_SETSIZE only; beyond that, poll(2).
        self._poll: Optional["select.poll"] = None
        if fd >= FD_SETSIZE:
            self._poll = select.poll()
            self._poll.register(fd, select.POLLIN)

    @classmethod
    def open(cls, path: str) -> Optional["Bell"]:
        lib = libc()
        if lib is None:
            return None
        try:
            fd = init(lib, IN_CLOEXEC | IN_NONBLOCK)
        except OSError:
            return None
        if lib.inotify_add_watch(fd, os.fsencode(path), IN_MODIFY) < 0:
            os.close(fd)
            return None
        return cls(fd)

    def clear(self) -> bool:
        """Forget the rings heard so far (so ``wait`` sleeps until the next);
        True if there were any."""
        heard = False
        try:
            while os.read(self.fd, 4096):  # type: ignore[arg-type]
                heard = True
        except BlockingIOError:
            pass
        return heard

    def wait(self, timeout: float) -> None:
        """Sleep until a ring not yet cleared, or ``timeout`` seconds."""
        if self._poll is None:
            select.select([self.fd], [], [], timeout)  # type: ignore[list-item]
        else:
            self._poll.poll(timeout * 1000.0)  # milliseconds, rounded up

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)
