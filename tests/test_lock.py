"""The writer lock between processes: still the flock other tools take, and
handed over so that a process writing back to back cannot starve another."""

import multiprocessing as mp
import os
import subprocess
import sys
import time

import filelock
import pytest

from stagger_sqlite import LockTimeoutError, StaggerQueue
from stagger_sqlite.inotify import Bell
from stagger_sqlite.wakeup import listen, unlisten
from stagger_sqlite.lock import _SLICE_INFO, COMEBACK, SLICE, SLICE_INFO_AT, STARVE, STARVING_BYTE, WAITER_BYTE, WriterLock

from .helpers import wait_for


def hog(path, started, stop):
    """Write back to back until told to stop."""
    with StaggerQueue(path, durability="normal") as q:
        q.write({"hog": 0})
        started.set()
        i = 0
        while not stop.is_set():
            i += 1
            q.write({"hog": i})


def test_a_back_to_back_writer_in_another_process_does_not_starve_us(qpath):
    StaggerQueue(qpath).close()
    ctx = mp.get_context("fork")
    started, stop = ctx.Event(), ctx.Event()
    p = ctx.Process(target=hog, args=(qpath, started, stop))
    p.start()
    try:
        assert started.wait(60)
        with StaggerQueue(qpath, durability="normal", timeout=30) as q:
            mine = [q.write({"me": i}) for i in range(100)]
    finally:
        stop.set()
        p.join(60)
    assert p.exitcode == 0
    assert mine == sorted(mine) and len(set(mine)) == 100


def announce_and_wait(lock_path, byte, ready, done):
    lock = WriterLock(lock_path, 0o600)
    lock._announce(byte, True)
    ready.set()
    done.wait(60)
    lock.close()


def a_waiter(qpath):
    """Another process announced as a writer waiting for the lock, until
    ``stop()``."""
    ctx = mp.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    p = ctx.Process(target=announce_and_wait, args=(qpath + ".lock", WAITER_BYTE, ready, done))
    p.start()
    assert ready.wait(60)

    def stop():
        done.set()
        p.join(60)

    return stop


@pytest.mark.parametrize("byte", [WAITER_BYTE, STARVING_BYTE])
def test_waiters_announce_themselves_to_other_processes_only(qpath, byte):
    StaggerQueue(qpath).close()
    mine = WriterLock(qpath + ".lock", 0o600)
    try:
        mine._announce(byte, True)
        assert not mine._others_announce(byte), "our own announcement is not someone else's"
        mine._announce(byte, False)
        ctx = mp.get_context("fork")
        ready, done = ctx.Event(), ctx.Event()
        p = ctx.Process(target=announce_and_wait, args=(qpath + ".lock", byte, ready, done))
        p.start()
        assert ready.wait(60)
        assert mine._others_announce(byte)
        done.set()
        p.join(60)
        wait_for(lambda: not mine._others_announce(byte), message="announcement gone with its process")
    finally:
        mine.close()


def test_the_announcements_leave_the_flock_alone(qpath):
    """Writers hold the flock on <path>.lock that filelock takes (SPEC §1),
    whatever waiters announce on the file's bytes."""
    with StaggerQueue(qpath, timeout=0.2) as q:
        other = WriterLock(qpath + ".lock", 0o600)
        other._announce(WAITER_BYTE, True)
        other._announce(STARVING_BYTE, True)
        outside = filelock.FileLock(qpath + ".lock")
        with outside.acquire(timeout=10):
            started = time.monotonic()
            with pytest.raises(LockTimeoutError):
                q.write({"blocked": True})
            assert time.monotonic() - started >= 0.2
        other.close()
        assert q.write({"after": True}) == 1


# -- the ring: how a waiting writer learns that the lock was released ---------

WRITE_ONCE = "import sys; from stagger_sqlite import StaggerQueue; StaggerQueue(sys.argv[1]).write('rung')"


def test_a_release_in_another_process_wakes_a_sleeping_writer(qpath):
    """Waiting writers sleep on the lock file (inotify) instead of polling:
    a commit elsewhere wakes them long before their timeout."""
    StaggerQueue(qpath).close()
    bell = Bell.open(qpath + ".lock")
    assert bell is not None, "inotify is available on Linux, where CI runs"
    waiter = WriterLock(qpath + ".lock", 0o600)
    waiter._announce(WAITER_BYTE, True)  # as a waiting writer does
    try:
        bell.clear()
        writer = subprocess.Popen([sys.executable, "-c", WRITE_ONCE, qpath])
        started = time.monotonic()
        bell.wait(30)
        assert time.monotonic() - started < 30, "the release rang"
        assert writer.wait(60) == 0
        assert bell.clear()
    finally:
        bell.close()
        waiter.close()


@pytest.mark.parametrize("durability", ["full", "normal"])
def test_a_write_rings_only_when_someone_listens_or_waits(qpath, durability):
    """A ring is a pwrite of the lock file and an event in every watching
    process: a writer skips it when no consumer exists anywhere and no writer
    waits (a spool nobody reads yet pays nothing for wake-ups). Consumers
    announce themselves (wakeup.listen) from the moment they are made."""
    write_once = WRITE_ONCE.replace("StaggerQueue(sys.argv[1])", f"StaggerQueue(sys.argv[1], durability={durability!r})")
    StaggerQueue(qpath).close()
    bell = Bell.open(qpath + ".lock")
    assert bell is not None, "inotify is available on Linux, where CI runs"
    try:
        bell.clear()
        assert subprocess.run([sys.executable, "-c", write_once, qpath], timeout=60).returncode == 0
        assert not bell.clear(), "nobody listened: no ring"
        with StaggerQueue(qpath) as q:
            consumer = q.consume(1, wait=False)  # made, not yet iterated: it listens
            assert subprocess.run([sys.executable, "-c", write_once, qpath], timeout=60).returncode == 0
            assert bell.clear(), "a consumer listened: the write rang"
            assert [s for s, _ in consumer] == [2]
            consumer.close()
        bell.clear()
        assert subprocess.run([sys.executable, "-c", write_once, qpath], timeout=60).returncode == 0
        assert not bell.clear(), "the consumer closed: no ring again"
    finally:
        bell.close()


def test_a_release_without_news_rings_only_when_a_writer_waits(qpath):
    """Commits no consumer waits for (purge, a new group) do not wake
    consumers, unless a writer waits for the lock and must hear it; news
    rings when some consumer listens. A release whose look found nobody
    does not look again for SLICE seconds: a consumer that comes meanwhile
    hears nothing from it until then (``Waiter`` covers that gap)."""
    StaggerQueue(qpath).close()
    lock = WriterLock(qpath + ".lock", 0o600)
    bell = Bell.open(qpath + ".lock")
    stop = None
    try:
        bell.clear()
        lock.acquire(1)
        lock.release(news=False)
        assert not bell.clear(), "nobody waited: no ring"
        lock.acquire(1)
        lock.release(news=True)
        assert not bell.clear(), "news, but no consumer listens: no ring"
        looked = time.monotonic()
        assert listen(qpath + ".lock")  # what every consumer does when it is made
        try:
            lock.acquire(1)
            lock.release(news=True)
            if time.monotonic() - looked < SLICE * 0.9:  # (a slow machine may be past it)
                assert not bell.clear(), "within SLICE of a look that found nobody: no new look, no ring"
            while time.monotonic() <= looked + SLICE:
                pass  # the quiet window is over: the next release looks again
            lock.acquire(1)
            lock.release(news=True)
            assert bell.clear(), "news rings for a listening consumer (even one of this process)"
        finally:
            unlisten(qpath + ".lock")
        stop = a_waiter(qpath)
        lock.acquire(1)
        lock.release(news=False)
        assert bell.clear(), "a writer waits: it must hear the release"
    finally:
        if stop is not None:
            stop()
        bell.close()
        lock.close()



def test_a_writer_that_saw_contention_rings_for_every_new_waiter(qpath):
    """The quiet window (no look, so no ring, for SLICE after a look that
    found nobody) is for a lone writer only: one that saw another writer
    wait in the last CONTENDED seconds looks at every release, so a writer
    that starts waiting is rung at the next release, not at its MAX_POLL."""
    StaggerQueue(qpath).close()
    lock = WriterLock(qpath + ".lock", 0o600)
    bell = Bell.open(qpath + ".lock")
    try:
        for round_ in ("first", "second"):
            stop = a_waiter(qpath)
            try:
                lock.acquire(1)
                lock.release(news=False)
                assert bell.clear(), f"{round_} waiter: rung at the next release"
            finally:
                stop()
            if round_ == "first":
                lock.acquire(1)
                lock.release(news=False)  # its look finds nobody now ...
                assert lock._quiet_until <= time.monotonic(), "... but it saw contention: no quiet window"
    finally:
        bell.close()
        lock.close()

def test_a_writer_in_its_slice_tells_waiters_when_it_will_be_back(qpath):
    """The release ring of a writer bound by the lock (it comes back sooner
    than it holds the lock) carries when it will be back (at most COMEBACK
    after its release, never past its slice) and when its slice ends:
    waiters leave it the lock until then. A lone write, a writer with work
    between its writes and a writer whose slice is over announce nothing."""
    StaggerQueue(qpath).close()
    holder = WriterLock(qpath + ".lock", 0o600)
    other = WriterLock(qpath + ".lock", 0o600)
    other._pid = -1  # reads the ring as another process would
    assert listen(qpath + ".lock")  # a consumer listens: every release with news rings
    try:
        holder.acquire(1)
        holder.release()
        assert other._holder_slice() == (0.0, 0.0), "a lone write keeps no slice"
        for _ in range(100):  # a loaded machine may stretch the pauses: try again
            holder._released_at = -1e9  # a new run
            holder.acquire(1)
            holder.release()
            holder.acquire(1)  # straight back: a run, a short pause
            time.sleep(COMEBACK)  # holds the lock longer than it paused
            before = time.monotonic()
            holder.release()
            after = time.monotonic()
            if holder._gap < COMEBACK and after < holder._run_start + SLICE:
                break
        back_by, slice_end = other._holder_slice()
        assert slice_end == holder._run_start + SLICE
        assert before < back_by <= min(after + COMEBACK, slice_end)
        assert holder._holder_slice() == (0.0, 0.0), "never a reason to wait for itself"
        holder.acquire(1)
        holder._run_start = time.monotonic() - 10 * SLICE  # its slice is over
        holder.release()
        assert other._holder_slice() == (0.0, 0.0)

        holder._released_at = -1e9  # a new run of a writer that works between writes
        holder.acquire(1)
        holder.release()
        time.sleep(2 * COMEBACK)  # its work
        holder.acquire(1)
        time.sleep(COMEBACK)
        holder.release()
        assert other._holder_slice() == (0.0, 0.0), "it hands over at once"
    finally:
        unlisten(qpath + ".lock")
        holder.close()
        other.close()


def contend(path, n, out):
    with StaggerQueue(path, durability="normal", timeout=60) as q:
        out.put([q.write({"pid": os.getpid(), "i": i}) for i in range(n)])


@pytest.mark.parametrize("wakeup", ["inotify", "poll"])
def test_contending_writers_get_every_write_in_without_inotify_too(qpath, wakeup, monkeypatch):
    """Four processes writing back to back: every write gets its own seqno,
    whether waiters sleep on the ring or poll (STAGGER_SQLITE_WAKEUP=poll)."""
    if wakeup == "poll":
        monkeypatch.setenv("STAGGER_SQLITE_WAKEUP", "poll")
    StaggerQueue(qpath).close()
    ctx = mp.get_context("spawn")  # the environment is read afresh
    out = ctx.Queue()
    procs = [ctx.Process(target=contend, args=(qpath, 300, out)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    seqs = sorted(s for part in got for s in part)
    assert seqs == list(range(1, 1201))
    assert all(part == sorted(part) for part in got)


def test_a_lock_that_slept_on_the_ring_still_works_after_fork(qpath):
    StaggerQueue(qpath).close()
    with StaggerQueue(qpath) as q:
        q.write("before")
        assert q._storage._writer_lock()._ring_bell() is not None
        ctx = mp.get_context("fork")
        out = ctx.Queue()
        child = ctx.Process(target=lambda: out.put(q.write("child")))
        child.start()
        assert out.get(timeout=60) == 2
        child.join(60)
        assert child.exitcode == 0
        assert q.write("parent") == 3


def test_a_timeout_takes_a_free_lock_even_from_a_writer_in_its_slice(qpath):
    """Deferring to another writer's slice is a hint: a waiter whose timeout
    runs out while the lock is free takes it rather than raising (here the
    last ring claims, wrongly, that its writer will be back in an hour, and
    the timeout is shorter than the wait after which a waiter ignores
    slices)."""
    StaggerQueue(qpath).close()
    lock = WriterLock(qpath + ".lock", 0o600)
    try:
        now = time.monotonic()
        os.pwrite(lock.fd, _SLICE_INFO.pack(now + 3600, now + 3600, os.getpid() + 1), SLICE_INFO_AT)
        lock._wait(lock.fd, STARVE / 2, courteous=False)  # returns holding the lock
        other = filelock.FileLock(qpath + ".lock")
        with pytest.raises(filelock.Timeout):
            other.acquire(timeout=0)
        lock.release()
        with other.acquire(timeout=10):
            pass
    finally:
        lock.close()


def test_held_neither_takes_the_lock_nor_drops_this_process_posix_locks(tmp_path):
    """lock.held() reads the kernel's table: a writer with timeout 0 never
    finds the lock taken by it, and this process's byte-range locks on the
    lock file (waiter announcements) survive it (closing any descriptor of
    the file would drop them)."""
    import fcntl
    import subprocess
    import sys

    from stagger_sqlite.lock import held

    path = str(tmp_path / "q.db.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 100)  # an announcement, byte 100
        assert held(path) is False
        holder = subprocess.Popen(  # another process (a FileLock here would close a descriptor too)
            [sys.executable, "-c", "import filelock, sys\nwith filelock.FileLock(sys.argv[1]):\n"
             "    print('held', flush=True)\n    sys.stdin.readline()", path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        assert held(path) is True
        holder.communicate("go\n", timeout=60)
        assert held(path) is False
        probe = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
                 "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 100)\nexcept OSError:\n    print('kept')\n")
        out = subprocess.run([sys.executable, "-c", probe, path], capture_output=True, text=True, timeout=60).stdout
        assert out.strip() == "kept"
    finally:
        os.close(fd)
