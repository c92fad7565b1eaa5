"""Storage: the SQLite connection of one queue file, its transactions, and the
one place where SQLite's errors become ours.

A ``Storage`` owns:

- the file's creation (atomic: a queue file either does not exist or is
  complete) and the checks that refuse what is not a queue;
- one apsw connection, shared by the threads of the process under a mutex,
  re-made after ``fork`` (a child never touches its parent's connection);
- the writer lock (``lock.WriterLock``) taken around every write transaction;
- ``read()``/``write()``: run a function in a short transaction and map errors.

It knows bytes and SQL only; codecs and seqno semantics live above it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import threading
import time
import weakref
from typing import Callable, Iterator, List, Optional, TypeVar

import apsw

from . import schema
from .durable import Horizon
from .errors import LockTimeoutError, NotAQueueError, QueueClosedError, StaggerError, StorageFullError
from .lock import WriterLock, held
from .wakeup import CloseEvent

T = TypeVar("T")

#: Longest a group-commit leader waits for the writers of the last batch to
#: come back with their next writes (and never longer than half the last
#: commit took): without it, the threads released by a commit trickle back
#: one by one (each needs the GIL) and batches shrink to two or three.
GATHER_MAX = 0.0002

#: Milliseconds SQLite's own busy handler may wait when no timeout was given.
FOREVER_MS = 2**31 - 1


def storage_error(path: str, e: apsw.Error) -> Exception:
    """Our exception for apsw's ``e`` about ``path``. The only place that maps.

    BusyError never escapes as such: "database is locked" becomes
    ``LockTimeoutError`` (our writers queue on the writer lock first, so SQLite
    reports busy only when something outside stagger_sqlite held the file for
    the whole timeout). An error it does not know is returned unchanged.
    """
    if isinstance(e, apsw.TooBigError):
        return StorageFullError(f"{path}: larger than SQLite's size limit for one value or row ({e}); nothing of this write was stored")
    if isinstance(e, apsw.FullError):
        return StorageFullError(f"{path}: the disk or the queue's size limit is full ({e}); nothing of this write was stored")
    if isinstance(e, (apsw.BusyError, apsw.LockedError)):
        # Not SQLite's own words: "database is locked" is what users must never see.
        return LockTimeoutError(
            f"{path} was held by a writer outside stagger_sqlite's writer lock for the whole timeout; nothing was written"
        )
    if isinstance(e, apsw.ReadOnlyError):
        return PermissionError(errno.EACCES, f"{path} is read-only here ({e}): writes are refused, reads still work", path)
    if isinstance(e, apsw.NotADBError):
        return NotAQueueError(f"{path} is not a SQLite file, so not a stagger_sqlite queue ({e})")
    if isinstance(e, apsw.CorruptError):
        return StaggerError(f"{path} is damaged ({e}); `stagger-sqlite check {path}` reports what is readable")
    if isinstance(e, apsw.CantOpenError):
        return PermissionError(errno.EACCES, f"cannot open {path} or its -wal/-shm files ({e})", path)
    if isinstance(e, apsw.IOError):
        if "disk is full" in str(e).lower():
            return StorageFullError(f"{path}: the disk is full ({e}); nothing of this write was stored")
        return StaggerError(f"{path}: I/O error ({e})")
    return e


@contextlib.contextmanager
def sqlite_errors(path: str) -> Iterator[None]:
    """Raise apsw's errors inside the block as ours (``storage_error``)."""
    try:
        yield
    except apsw.Error as e:
        mapped = storage_error(path, e)
        if mapped is e:
            raise
        raise mapped from None


# Every live Storage, so fork handlers can make each safe for the child.
_LIVE: "weakref.WeakSet[Storage]" = weakref.WeakSet()
_FORKING: List["Storage"] = []


def _before_fork() -> None:
    # SQLite keeps per-process lock state per file; a child that inherited a
    # live connection (even one it never uses) shares that state with its own
    # new connection and would believe it holds locks it does not. So the
    # parent closes its handles (cheap: no checkpoint on close) and both sides
    # reopen lazily. Taking each mutex first waits out a transaction in flight.
    _FORKING[:] = list(_LIVE)
    for s in _FORKING:
        s._lock_guard.acquire()
        s._mutex.acquire()
        s._drop_handles()


def _after_fork_parent() -> None:
    for s in _FORKING:
        s._mutex.release()
        s._lock_guard.release()
    _FORKING.clear()


def _after_fork_child() -> None:
    for s in _FORKING:
        # Other threads did not survive the fork; start from fresh locks.
        s._mutex = threading.RLock()
        s._lock_guard = threading.RLock()
        s._group_lock = threading.Lock()
        s._group = threading.Condition(s._group_lock)
        s._gather = threading.Condition(s._group_lock)
        s._gathering = False
        s._pending = []
        s._waiting = 0
        s._leading = False
        s._crowd = 0
        s._leader = None
        if s._horizon is not None:
            s._horizon.after_fork()
    _FORKING.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent, after_in_child=_after_fork_child)


def _copy_error(e: BaseException) -> BaseException:
    """A fresh exception like ``e`` (same type and message), chained to it."""
    try:
        copy = type(e)(*e.args)
    except Exception:
        return e
    copy.__cause__ = e
    return copy


class _Job:
    """One caller of ``Storage.write`` waiting for its transaction."""

    __slots__ = ("fn", "notify", "may_raise", "appends", "started", "done", "result", "error")

    def __init__(
        self, fn: Callable[[apsw.Connection], object], notify: bool, may_raise: bool, appends: bool, started: float
    ) -> None:
        self.fn = fn
        self.notify = notify
        self.may_raise = may_raise
        self.appends = appends
        self.started = started
        self.done = False
        self.result: object = None
        self.error: Optional[BaseException] = None


class Storage:
    """The SQLite side of one queue file. Thread-safe; fork-aware.

    Raises (at construction):
        NotAQueueError: the path is a directory, not SQLite, another schema,
            or a newer format version. Such a file is never written to.
        FileNotFoundError: the directory of ``path`` does not exist.
        PermissionError: the file or its directory cannot be read or written.
        LockTimeoutError: creating the file waited too long for the lock.
    """

    def __init__(self, path: str, *, durability: str, timeout: Optional[float], mode: int) -> None:
        self.path = path
        self.lock_path = path + ".lock"
        self.durability = durability
        self.timeout = timeout
        self.mode = mode
        self._mutex = threading.RLock()  # the connection
        #: Held by a writer from before it waits for the writer lock until
        #: its commit; close and fork take it first, then the mutex.
        self._lock_guard = threading.RLock()  # reentrant: a signal handler may close() mid-write
        # Group commit: writers queue in _pending; one leads at a time.
        self._group_lock = threading.Lock()
        self._group = threading.Condition(self._group_lock)
        self._gather = threading.Condition(self._group_lock)  # the gathering leader waits here
        self._gathering = False
        self._last_commit = 0.0  # seconds the last batch's transaction took
        self._pending: List[_Job] = []
        self._waiting = 0  # threads waiting on _group
        self._leading = False
        self._crowd = 0  # size of the last batch: >1 means threads contend
        self._leader: Optional[int] = None  # thread running a batch
        self._conn: Optional[apsw.Connection] = None
        #: The connection's own cursor, for the statements of every write
        #: (see ``cursor``).
        self._cursor: Optional[apsw.Cursor] = None
        #: durability="full": the WAL fsyncs after commits (durable.py).
        self._horizon = Horizon(path) if durability == "full" else None
        self._wal_sized = False  # Horizon.preallocate done for this connection
        self._lock: Optional[WriterLock] = None
        self._closed = False
        #: Set by close(); waiters watch it so close() from another thread ends them.
        self.closed_event = CloseEvent()
        self._open_or_create()
        _LIVE.add(self)

    # -- opening ---------------------------------------------------------

    def _open_or_create(self) -> None:
        _check_regular(self.path)
        try:
            header = schema.read_header(self.path)
        except FileNotFoundError:
            header = b""
        if header:
            schema.check_header(self.path, header)
        else:
            self._create()
        self._connection()  # verify schema and version now, not at first use

    def _create(self) -> None:
        """Create the queue file atomically, under the writer lock.

        Built under a temporary name and renamed into place, so no process
        ever sees a half-made queue, and two processes creating the same path
        at once end with one queue.
        """
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise FileNotFoundError(errno.ENOENT, f"directory {parent} does not exist", self.path)
        lock = self._writer_lock()
        lock.acquire(self.timeout)
        tmp = f"{self.path}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            _remove_stale_temporaries(self.path)
            _check_regular(self.path)
            try:
                if os.path.getsize(self.path) > 0:
                    schema.check_header(self.path, schema.read_header(self.path))
                    return  # another process created it while we waited
            except FileNotFoundError:
                pass
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, self.mode)
            try:
                os.fchmod(fd, self.mode)
            finally:
                os.close(fd)
            conn = apsw.Connection(tmp)
            try:
                with sqlite_errors(self.path):
                    schema.build(conn)
            finally:
                conn.close()  # last connection: folds and removes tmp-wal
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            # A horizon in the lock file is about the file this one replaces.
            Horizon.reset(lock.fd)  # type: ignore[arg-type]
            os.replace(tmp, self.path)
            _fsync_dir(parent)
        finally:
            for leftover in (tmp, tmp + "-wal", tmp + "-shm", tmp + "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
            lock.release()

    def _connection(self) -> apsw.Connection:
        """The process's connection, opened (and checked) on first use."""
        if self._conn is None:
            self._conn = self._connect()
            self._cursor = self._conn.cursor()
        return self._conn

    @property
    def cursor(self) -> apsw.Cursor:
        """A cursor of the connection kept for statements that return no
        rows, run at every write (BEGIN, COMMIT, a message's INSERT):
        ``conn.execute`` makes a new cursor object each time, which apsw
        tracks with a weak reference (0.4 us a statement, more right after
        an fsync). Only inside a ``write``/``read`` function, like the
        connection it is given."""
        assert self._cursor is not None
        return self._cursor

    def _connect(self) -> apsw.Connection:
        with sqlite_errors(self.path):
            try:
                conn = apsw.Connection(self.path, flags=apsw.SQLITE_OPEN_READWRITE)
            except apsw.CantOpenError:
                if not os.path.exists(self.path):
                    raise FileNotFoundError(errno.ENOENT, "queue file vanished", self.path) from None
                raise
            try:
                schema.connection_no_checkpoint_on_close(conn)
                schema.connection_busy_timeout(conn, self._busy_ms(self.timeout))
                schema.connection_durability(conn, self.durability)
                schema.connection_wal_limits(conn)
                version = schema.version_of(conn)
                schema.check_version(self.path, version)
                if version < schema.FORMAT_VERSION:
                    self._locked(lambda: schema.migrate(conn, version))
                schema.check_tables(conn, self.path)
                if conn.execute("PRAGMA journal_mode").fetchall()[0][0].lower() != "wal":
                    # Someone switched the file out of WAL; concurrent readers need it.
                    self._locked(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchall())
            except apsw.ReadOnlyError:
                conn.close()
                # Reading a WAL file needs its -shm: SQLite could not create it.
                raise PermissionError(
                    errno.EACCES,
                    f"cannot open {self.path}: it is read-only and SQLite may not create "
                    f"{self.path}-wal/-shm beside it (a WAL-mode file needs them even to read)",
                    self.path,
                ) from None
            except BaseException:
                conn.close()
                raise
        return conn

    def _writer_lock(self) -> WriterLock:
        # Opened on first write, so a read-only directory still allows reads.
        if self._lock is None:
            try:
                self._lock = WriterLock(self.lock_path, self.mode)
            except OSError as e:
                # A read-only mount says EROFS, which is no PermissionError:
                # callers get one error for "cannot write here", naming the file.
                if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                raise PermissionError(
                    e.errno, f"cannot open the writer lock file {self.lock_path} ({e.strerror}): writes are refused, reads still work", self.lock_path
                ) from None
        return self._lock

    def writer_busy(self) -> bool:
        """Whether some writer holds the writer lock right now."""
        return held(self.lock_path)

    def _locked(self, fn: Callable[[], T]) -> T:
        lock = self._writer_lock()
        lock.acquire(self.timeout)
        try:
            return fn()
        finally:
            lock.release()

    @staticmethod
    def _busy_ms(seconds: Optional[float]) -> int:
        if seconds is None or seconds * 1000 >= FOREVER_MS:  # also float("inf")
            return FOREVER_MS
        return max(1, min(FOREVER_MS, int(seconds * 1000)))

    # -- transactions ----------------------------------------------------

    def read(self, fn: Callable[[apsw.Connection], T], *, snapshot: bool = False) -> T:
        """Run ``fn(conn)`` and return its result; no transaction outlives it.

        With ``snapshot``, the statements of ``fn`` share one read transaction
        (a consistent view); otherwise each statement is its own.

        Raises:
            QueueClosedError: the storage was closed.
        """
        with self._mutex:
            conn = self._open_conn()
            with sqlite_errors(self.path):
                if not snapshot:
                    return fn(conn)
                conn.execute("BEGIN")
                try:
                    return fn(conn)
                finally:
                    conn.execute("COMMIT")

    def write(
        self, fn: Callable[[apsw.Connection], T], *, notify: bool = True, may_raise: bool = True, appends: bool = False
    ) -> T:
        """Run ``fn(conn)`` in a ``BEGIN IMMEDIATE`` transaction, under the
        writer lock; commit if it returns, roll back if it raises. Returns
        only once the commit is durable (to the degree ``durability`` says).
        ``notify``: wake the consumers waiting for news (``WriterLock.release``);
        False for changes no consumer waits for. ``may_raise=False``: ``fn``
        raises nothing but SQLite's errors (which fail the whole shared
        transaction anyway), so in a batch it needs no savepoint of its own.
        ``appends``: ``fn`` returns the seqno (or list of seqnos) of the
        messages it appended; with durability "full" they are published as
        durable after the fsync (other commits publish nothing new: cheaper
        than asking SQLite, and a horizon may lag, never lead).

        Group commit: threads of this process that write at the same time
        share one transaction and one fsync. One of them (the leader) runs
        every waiting ``fn`` in turn, each inside its own savepoint, then
        commits once; the others wait for that commit. A ``fn`` that raises a
        Python error is rolled back alone and only its caller sees the error;
        if SQLite fails (disk full, I/O error, lock timeout) or the commit
        fails, the whole transaction is rolled back and every writer in it
        gets the error: nothing of theirs is stored.

        This is the path of every durable write, so it is kept short: code
        run around a commit costs two to three times its usual time, because
        the fsync has put the CPU to sleep (measured in issue 6).

        Raises:
            QueueClosedError: the storage was closed.
            LockTimeoutError: the writer lock (or, against programs that bypass
                it, SQLite's write lock) stayed taken for ``timeout`` seconds.
            StorageFullError: the disk or size limit is full.
        """
        me = threading.get_ident()
        if self._leader == me:
            # fn of a write in progress called write(): waiting for our own
            # batch would never end.
            raise RuntimeError(f"{self.path}: a write transaction cannot start another write")
        started = time.monotonic()
        group_lock = self._group_lock
        with group_lock:
            # Alone: no other thread of ours writes now, nor did in the last
            # batch. The common case, and the short path.
            solo = not self._leading and not self._pending and self._crowd <= 1
            if solo:
                self._leading = True
                self._leader = me
        if not solo:
            return self._write_in_group(_Job(fn, notify, may_raise, appends, started))
        try:
            return self._transaction(fn, notify, started, _last_seq_of if appends else None)
        finally:
            self._end_lead()

    def _write_in_group(self, job: "_Job") -> T:
        """``write`` when other threads of this process write too: join the
        waiting writers, or lead them all in one transaction."""
        with self._group_lock:
            self._pending.append(job)
            if self._gathering and len(self._pending) >= self._crowd:
                self._gather.notify()
            if self._leading:
                self._waiting += 1
                try:
                    # Another thread of ours holds the writer lock (leads): the
                    # timeout bounds this wait too, until a leader takes us
                    # into its batch; from then on that batch's outcome is ours.
                    deadline = None if self.timeout is None else job.started + self.timeout
                    while self._leading and not job.done:
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            if job in self._pending:
                                self._pending.remove(job)
                                raise LockTimeoutError(
                                    f"waited {self.timeout:g} s for the writer lock {self.lock_path} "
                                    "(held by another thread of this process); nothing was written"
                                )
                            left = None
                        self._group.wait(left)
                except BaseException:  # KeyboardInterrupt while waiting
                    if job in self._pending:
                        self._pending.remove(job)  # not taken yet: withdraw it
                    raise
                finally:
                    self._waiting -= 1
            if not job.done:
                # Lead: take every writer waiting now (ourselves included).
                self._leading = True
                if self._crowd > 1:
                    self._gather_crowd(job)
                batch, self._pending = self._pending, []
                self._crowd = len(batch)
                self._leader = threading.get_ident()
        if not job.done:
            try:
                self._commit_batch(batch, job)
            finally:
                self._end_lead()
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    def _gather_crowd(self, job: "_Job") -> None:
        """Wait (holding the group lock, as leader) until as many writers are
        pending as the last batch had, GATHER_MAX or half the last commit at
        most: one fsync then serves them all."""
        limit = time.monotonic() + min(GATHER_MAX, self._last_commit / 2)
        self._gathering = True
        try:
            while len(self._pending) < self._crowd:
                left = limit - time.monotonic()
                if left <= 0:
                    break
                self._gather.wait(left)
        except BaseException:  # KeyboardInterrupt: withdraw, hand the lead on
            if job in self._pending:
                self._pending.remove(job)
            self._leading = False
            self._group.notify_all()
            raise
        finally:
            self._gathering = False

    def _end_lead(self) -> None:
        with self._group_lock:
            self._leader = None
            self._leading = False
            if self._waiting:
                self._group.notify_all()

    def _acquire_both(self, lock: WriterLock, started: float, remaining: Optional[float]) -> bool:
        """Take the writer lock, then the connection's mutex; returns whether
        it waited. A local reader may hold the mutex for long (``check``, a
        big snapshot): rather than sit on the cross-process lock meanwhile,
        let it go, wait the reader out, and queue for the lock again."""
        waited = False
        while True:
            waited = lock.acquire(remaining) or waited
            try:
                if self._mutex.acquire(blocking=False):
                    return waited
            except BaseException:  # KeyboardInterrupt: never keep the lock
                lock.release(news=False)
                raise
            lock.release(news=False)
            with self._mutex:
                pass
            if remaining is not None:
                remaining = max(0.0, self.timeout - (time.monotonic() - started))  # type: ignore[operator]

    def _transaction(
        self,
        fn: Callable[[apsw.Connection], T],
        notify: bool,
        started: float,
        seq_of: Optional[Callable[[T], int]] = None,
    ) -> T:
        """``fn(conn)`` between ``BEGIN IMMEDIATE`` and ``COMMIT``, under the
        writer lock, within what is left of the timeout of a write that
        started at ``started``. Rolls back and raises (mapped) if anything
        fails. Returns once the commit is durable (to the degree
        ``durability`` says). The caller leads (no other thread of ours is
        in here).

        durability="full": the WAL is fsynced after the commit, once both
        locks are free (durable.py says why); ``seq_of(result)`` is the
        highest seqno ``fn`` appended, published after the fsync as durable
        to every process, which rings the consumers.
        """
        horizon = self._horizon
        with self._lock_guard:
            with self._mutex:
                conn = self._open_conn()
                cursor = self._cursor
                lock = self._lock or self._writer_lock()
            timeout = self.timeout
            remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
            # Not under the mutex: the threads of this process that read go
            # on while we wait for another process's write. The connection
            # and the lock stay open meanwhile: close and fork take the guard.
            waited = self._acquire_both(lock, started, remaining)
            try:
                # SQLite's own wait (for programs that bypass our lock) gets what
                # is left of the timeout, no more.
                bound = remaining is not None and (waited or remaining < timeout - 0.01)  # type: ignore[operator]
                news = False
                try:
                    if self._closed:  # close() came while we waited: it waits for us
                        raise self.closed_error()
                    if bound:
                        conn.set_busy_timeout(self._busy_ms(timeout - (time.monotonic() - started)))  # type: ignore[operator]
                    cursor.execute("BEGIN IMMEDIATE")
                    if horizon is not None and not self._wal_sized:
                        self._wal_sized = True
                        horizon.preallocate(schema.JOURNAL_SIZE_LIMIT)
                    try:
                        result = fn(conn)
                        cursor.execute("COMMIT")
                        if horizon is not None:
                            if seq_of is not None:
                                seq = seq_of(result)
                                if seq > horizon.committed_seq:
                                    horizon.committed_seq = seq
                            sync_number = horizon.next_sync()
                    except BaseException:
                        if conn.in_transaction:
                            with contextlib.suppress(apsw.Error):
                                conn.execute("ROLLBACK")
                        raise
                    # In full mode the news rings once it is durable (below).
                    news = notify and horizon is None
                except apsw.Error as e:
                    raise storage_error(self.path, e) from None
                finally:
                    lock.release(news=news)
                    if bound:  # reads get the whole timeout again
                        conn.set_busy_timeout(self._busy_ms(timeout))
            finally:
                self._mutex.release()
        if horizon is None:
            return result
        durable = horizon.sync(sync_number)
        # No consumer anywhere (none listened at our release): no ring; one
        # that comes later fsyncs what it finds unpublished.
        if notify and lock.listening:
            with self._mutex:  # close() closes the lock file under it
                if lock.fd is not None:
                    horizon.publish(lock.fd, durable)
        return result

    def ensure_durable(self, seq: int) -> None:
        """Return once messages up to ``seq`` (read by a consumer) are on
        disk; at once unless durability is "full" (durable.py).

        Raises:
            StaggerError: an fsync failed.
        """
        if self._horizon is not None and seq > self._horizon.durable_seq:
            self._horizon.ensure(seq, lambda: self.read(schema.last_seq))

    def _commit_batch(self, batch: List["_Job"], leader: "_Job") -> None:
        """Run ``batch`` in one transaction and settle every job in it."""
        try:
            began = time.monotonic()
            notify = any(j.notify for j in batch)
            self._transaction(lambda conn: self._run_jobs(conn, batch), notify, batch[0].started, int)
            self._last_commit = time.monotonic() - began
        except BaseException as e:
            for j in batch:
                if j.error is None:
                    # Each thread raises its own exception object (raising
                    # one object in several threads tangles its traceback).
                    j.error = e if j is leader else _copy_error(e)
                    j.result = None
            if not isinstance(e, Exception):
                raise  # KeyboardInterrupt and kin: the leader's own, too
        finally:
            for j in batch:
                j.done = True

    @staticmethod
    def _run_jobs(conn: apsw.Connection, batch: List["_Job"]) -> int:
        """Each job that may raise in its own savepoint: its Python error
        undoes its part only; SQLite's errors fail the whole transaction.
        Returns the highest seqno the jobs that append appended (or 0)."""
        appended = 0
        for job in batch:
            if not job.may_raise:
                job.result = job.fn(conn)
            else:
                conn.execute("SAVEPOINT stagger_job")
                try:
                    job.result = job.fn(conn)
                except apsw.Error:
                    raise
                except Exception as e:
                    conn.execute("ROLLBACK TO stagger_job")
                    job.error = e
                conn.execute("RELEASE stagger_job")
            if job.appends and job.error is None:
                appended = max(appended, _last_seq_of(job.result))
        return appended

    def _open_conn(self) -> apsw.Connection:
        if self._closed:
            raise self.closed_error()
        return self._connection()

    def closed_error(self) -> QueueClosedError:
        """The error of any use after ``close()``."""
        return QueueClosedError(f"queue {self.path} is closed")

    # -- lifetime --------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the connection and the lock file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.closed_event.set()
        with self._lock_guard, self._mutex:
            self._drop_handles()
        if self._horizon is not None:
            self._horizon.close()
        _LIVE.discard(self)

    def _drop_handles(self) -> None:
        if self._horizon is not None:
            self._horizon.drop_wal()
        conn, self._conn = self._conn, None
        self._cursor = None
        self._wal_sized = False
        if conn is not None:
            with contextlib.suppress(apsw.Error):
                conn.close(True)
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.close()


def _last_seq_of(result: object) -> int:
    """The highest seqno in an appending write's result (a seqno or a list)."""
    if isinstance(result, int):
        return result
    return result[-1] if result else 0  # type: ignore[index]


def _check_regular(path: str) -> None:
    """Refuse a path that exists and is not a regular file (or a link to one).

    A device, FIFO or socket is never a queue: reading its header could block
    forever (a FIFO), and an empty one would be taken for a missing file and
    *replaced* by a new queue (``/dev/null`` renamed over, as root).

    Raises:
        NotAQueueError: naming what the path is.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode):
        return
    kind = "a directory" if stat.S_ISDIR(mode) else "a device, FIFO or socket, not a regular file"
    raise NotAQueueError(f"{path} is {kind}, not a queue file")


def _remove_stale_temporaries(path: str) -> None:
    """Delete what creators killed mid-creation left: ``<path>.tmp-<pid>-<thread>``
    and its -wal/-shm/-journal. Called under the writer lock, which every
    creator holds for as long as its temporary exists: any found now is stale.
    """
    directory, base = os.path.split(os.path.abspath(path))
    stale = re.compile(re.escape(base) + r"\.tmp-\d+-\d+(-wal|-shm|-journal)?")
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if stale.fullmatch(name):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


def _fsync_dir(path: str) -> None:
    """Make a rename durable: fsync the directory that holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
