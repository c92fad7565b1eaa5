"""The writer lock between processes: still the flock other tools take, and
handed over so that a process writing back to back cannot starve another."""

import multiprocessing as mp
import time

import filelock
import pytest

from stagger_sqlite import LockTimeoutError, StaggerQueue
from stagger_sqlite.lock import STARVING_BYTE, WAITER_BYTE, WriterLock

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
