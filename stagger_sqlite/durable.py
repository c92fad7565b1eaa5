"""The durable horizon of a ``durability="full"`` queue: the WAL fsync that
makes commits durable, and what every process knows to be on disk.

Why not SQLite's ``synchronous=FULL``: it fsyncs the WAL inside ``COMMIT``,
while the writer still holds SQLite's write lock and ours, so writers of
other processes wait out every fsync of everyone else, one after the other
(four producers wrote 0.6x as fast as one, issue 6). Here a commit is made
with ``synchronous=NORMAL`` (no fsync), the locks are released, and then the
writer fsyncs the WAL itself before its ``write`` returns. While it waits for
the disk, the next writer commits; one fsync of the WAL covers every commit
made before it began, whoever made them (the kernel flushes the file, not a
descriptor), and fsyncs of several processes overlap in the kernel.

It promises what FULL promises: a write that returned is on disk. The WAL is
append-only between checkpoints, and a checkpoint fsyncs the WAL before it
copies it into the database and fsyncs that before the WAL is ever reused
(SQLite does this in NORMAL mode too), so an fsync of the WAL after a commit
makes that commit and every earlier one durable.

What it changes: a commit is visible to readers before its fsync (with FULL,
only after). A consumer must then never deliver a message a power cut could
take back (its seqno would be handed out again, and a consumer that acted on
it would skip the new message). So a full-mode consumer delivers a row only
once it knows the row is durable: a writer, after its fsync, publishes the
highest seqno it made durable in the lock file (``HORIZON_AT``), tagged with
the boot and the queue file it is about; a consumer whose rows go beyond it
fsyncs the WAL itself (cheap: the writer's fsync is in flight or done). The
publish is also the ring that wakes consumers, so a writer skips it when no
consumer exists anywhere (``lock.LISTENER_BYTE``): one that comes later finds
nothing published and makes the backlog durable with one fsync.

The WAL is given its working size up front (``Horizon.preallocate``): an
fsync of a file that grew must also commit the new size to the file
system's journal, which made each of a new queue's first ~500 durable writes
1.7x as slow (measured, issue 6), until the WAL reached the size at which a
checkpoint lets SQLite reuse it from the start.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from typing import Callable, Dict, Optional, Tuple

from .errors import StaggerError

#: Where in the lock file the horizon is published (beyond the lock's own
#: bytes, see lock.py): boot id, device and inode of the queue file, seqno,
#: and a CRC of them (a torn read never passes for a horizon).
HORIZON_AT = 64
_WHERE = struct.Struct("16sQQ")  # boot id, device and inode of the queue file
_SEQ_CRC = struct.Struct("qI")  # seqno, CRC of everything before it
_SIZE = _WHERE.size + _SEQ_CRC.size


def _boot_id() -> Optional[bytes]:
    """This boot's id (Linux); a horizon from an earlier boot means nothing:
    what a power cut took is gone, and its seqnos are handed out again."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return bytes.fromhex(f.read().decode("ascii").strip().replace("-", ""))[:16].ljust(16, b"\0")
    except (OSError, ValueError):  # pragma: no cover - not Linux: no shared horizon
        return None


BOOT_ID = _boot_id()


#: ``preallocate`` fills nothing when the file system has less free than this.
PREALLOCATE_MIN_FREE = 64 * 1024 * 1024


def _fdatasync(fd: int) -> None:
    # Looked up at each call: tests/powercut.py models this call on its disk.
    (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(fd)


class Horizon:
    """Fsyncs of one queue's WAL for the threads of a process, and the
    highest seqno known durable. Thread-safe; ``after_fork`` in a child."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.wal_path = path + "-wal"
        self.lock_path = path + ".lock"
        # `with self._mutex`, not `with self._cv`: a Condition's __enter__ and
        # __exit__ are Python functions, and sync() runs at every durable write.
        self._mutex = threading.Lock()
        self._cv = threading.Condition(self._mutex)
        self._started = 0  # fsyncs begun by this process (they run one at a time)
        self._done = 0  # of those, finished (all of them: they are serialised)
        self._syncing = False
        self._waiters = 0  # threads waiting for the running fsync
        self._wal_fd: Optional[int] = None
        self._read_fd: Optional[int] = None  # lock file, for reading the horizon
        self._closed = False
        self._drop = False  # drop the WAL descriptor after the running fsync
        self._failed: Dict[int, str] = {}  # fsyncs that failed (rare): number -> why
        #: Highest seqno committed by this process, and known durable.
        self.committed_seq = 0
        self.durable_seq = 0
        self._where_cache: Optional[Tuple[bytes, int]] = None

    # -- writers ---------------------------------------------------------

    def next_sync(self) -> int:
        """The number of the first fsync that will begin from now on: a
        commit made before this call is durable once that fsync is done."""
        return self._started + 1

    def sync(self, number: int) -> int:
        """Return once fsync ``number`` (or a later one) of this process has
        finished; run it if nobody does. Returns the seqno it made durable.

        Raises:
            StaggerError: the fsync failed (an I/O error): what was committed
                is readable but may not survive a power cut.
        """
        # Kept lean after the fsync: code run right after it costs two to
        # three times its usual time (the CPU slept; measured, issue 6).
        mutex = self._mutex
        with mutex:
            while self._done < number:
                if self._syncing:
                    self._waiters += 1
                    try:
                        self._cv.wait()
                    finally:
                        self._waiters -= 1
                    continue
                self._syncing = True
                self._started = mine = self._started + 1
                seq = self.committed_seq  # every commit so far is covered
                synced = False
                try:
                    fd = self._wal_fd if self._wal_fd is not None else self._wal()
                    mutex.release()
                    try:
                        if fd is not None:
                            _fdatasync(fd)
                        synced = True
                    finally:
                        mutex.acquire()
                except OSError as e:
                    # Every commit this fsync was to cover fails with it,
                    # its waiters too: retrying would "succeed" (the kernel
                    # reports a writeback error once) without the data.
                    self._failed[mine] = f"fsync of the WAL failed ({e})"
                finally:
                    self._done = mine
                    self._syncing = False
                    if self._waiters or self._closed or self._drop:
                        self._after_sync()
                if synced and seq > self.durable_seq:
                    self.durable_seq = seq
            failed = self._failed.get(number) if self._failed else None
            if failed is not None:
                raise StaggerError(f"{self.path}: {failed}; what was just written is stored but may not survive a power cut")
            return self.durable_seq

    def preallocate(self, size: int) -> None:
        """Extend the WAL to ``size`` bytes with zeros, durably, if it is
        smaller (and the file system has room to spare). Called by the
        storage inside a write transaction, before its first commit: SQLite's
        write lock keeps every other writer off the WAL meanwhile, and bytes
        past the last valid frame are never read as frames (their salt and
        checksum do not match the WAL header), as after any WAL reset.

        A hint: any failure (a full disk) leaves the WAL as it was.
        """
        try:
            fd = os.open(self.wal_path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return
        try:
            start = os.fstat(fd).st_size
            if start >= size:
                return
            fs = os.fstatvfs(fd)
            if fs.f_bavail * fs.f_frsize < PREALLOCATE_MIN_FREE:
                return
            zeros = bytes(min(size - start, 1 << 20))
            end = start
            try:
                while end < size:
                    end += os.pwrite(fd, zeros[: size - end], end)
                _fdatasync(fd)
            except OSError:
                try:
                    os.ftruncate(fd, start)
                except OSError:
                    pass
        except OSError:
            pass
        finally:
            os.close(fd)

    def _after_sync(self) -> None:
        """What an fsync's end owes others (rare, so not inlined): wake the
        threads waiting for it, close what was closed or dropped meanwhile."""
        if self._waiters:
            self._cv.notify_all()
        if self._closed:
            self._close_fds()
        elif self._drop:
            self._close_wal()

    def _wal(self) -> Optional[int]:
        """A descriptor of the WAL (None: there is none, so everything is in
        the database file, which checkpoints fsync). Called under ``_mutex``.

        Kept until ``drop_wal``: while the storage's connection is open it
        holds a shared lock on the database file, and SQLite deletes a WAL
        only under an exclusive one, so the file stays the live WAL. Not
        checked with ``fstat`` at each fsync: on this kernel a stat between a
        write and its fsync made the fsync 75 us slower (measured, issue 6).
        """
        if self._wal_fd is None:
            try:
                self._wal_fd = os.open(self.wal_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                return None
        return self._wal_fd

    def publish(self, lock_fd: int, seq: int) -> None:
        """Tell every process that messages up to ``seq`` are durable (and
        wake the consumers waiting for news: the write rings, see wakeup.py)."""
        where = self._where()
        if where is None:
            data = b"\0" * _SIZE  # no horizon to share (not Linux): still ring
        else:
            seq_bytes = struct.pack("q", seq)
            data = where[0] + _SEQ_CRC.pack(seq, zlib.crc32(seq_bytes, where[1]))
        try:
            os.pwrite(lock_fd, data, HORIZON_AT)
        except OSError:
            pass  # a hint: consumers then fsync themselves

    @staticmethod
    def reset(lock_fd: int) -> None:
        """Forget the horizon: the queue file is new (``Storage._create``)."""
        os.pwrite(lock_fd, b"\0" * _SIZE, HORIZON_AT)

    # -- readers ---------------------------------------------------------

    def ensure(self, seq: int, last_seq: Callable[[], int]) -> None:
        """Return once messages up to ``seq`` (already read, so committed)
        are durable: known here, published by a writer, or by an fsync of
        our own. ``last_seq()`` reads the highest seqno committed now.

        Raises:
            StaggerError: the fsync failed.
        """
        if seq <= self.durable_seq:
            return
        published = self._published()
        if published >= seq:
            self._raise_durable(published)
            return
        upto = last_seq()  # committed before the fsync below begins
        self.sync(self.next_sync())
        self._raise_durable(upto)

    def _raise_durable(self, seq: int) -> None:
        with self._mutex:
            if seq > self.durable_seq:
                self.durable_seq = seq

    def _published(self) -> int:
        where = self._where()
        if where is None:
            return 0
        with self._mutex:  # close() closes the descriptor under it
            if self._closed:
                return 0
            try:
                if self._read_fd is None:
                    self._read_fd = os.open(self.lock_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                data = os.pread(self._read_fd, _SIZE, HORIZON_AT)
            except OSError:
                return 0
        # About this boot and this file, and whole (a torn read fails the CRC).
        if len(data) != _SIZE or data[: _WHERE.size] != where[0]:
            return 0
        seq, crc = _SEQ_CRC.unpack(data[_WHERE.size :])
        return seq if zlib.crc32(data[_WHERE.size : _SIZE - 4], where[1]) == crc else 0

    def _where(self) -> Optional[Tuple[bytes, int]]:
        """Boot id, device and inode of the queue file, packed, and their
        CRC: what names the horizon's boot and file (None: not Linux)."""
        if self._where_cache is None and BOOT_ID is not None:
            try:
                st = os.stat(self.path)
            except OSError:
                return None
            packed = _WHERE.pack(BOOT_ID, st.st_dev, st.st_ino)
            self._where_cache = (packed, zlib.crc32(packed))
        return self._where_cache

    # -- lifetime --------------------------------------------------------

    def drop_wal(self) -> None:
        """The storage closed its connection (close, fork): once none is
        open, another program's last connection may delete the WAL, so the
        next fsync opens it anew (a running fsync drops it when it ends)."""
        with self._mutex:
            if self._syncing:
                self._drop = True
            else:
                self._close_wal()

    def after_fork(self) -> None:
        """In a fork child: no other thread survived, so no fsync is running.
        The WAL descriptor may be one a parent's fsync was still using when
        the parent dropped its connection: open the WAL anew."""
        self._mutex = threading.Lock()
        self._cv = threading.Condition(self._mutex)
        self._syncing = False
        self._waiters = 0
        self._done = self._started
        self._close_wal()

    def close(self) -> None:
        """Close the descriptors (a running fsync closes them when it ends)."""
        with self._mutex:
            self._closed = True
            if not self._syncing:
                self._close_fds()

    def __del__(self) -> None:
        # Dropped without close() (a queue never closed): no descriptor leaks.
        try:
            self._close_fds()
        except Exception:  # at interpreter exit
            pass

    def _close_wal(self) -> None:
        self._drop = False
        fd, self._wal_fd = self._wal_fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _close_fds(self) -> None:
        for name in ("_wal_fd", "_read_fd"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                try:
                    os.close(fd)
                except OSError:
                    pass
