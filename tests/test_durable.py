"""durability="full": the WAL fsync made after the commit, out of the locks,
and the durable horizon a writer publishes in the lock file for consumers
(stagger_sqlite/durable.py). What a power cut keeps is checked on a modelled
disk in tests/test_powerloss.py; these tests check the horizon's bookkeeping
between real processes."""

import multiprocessing
import os
import struct
import zlib

import pytest

from stagger_sqlite import StaggerQueue
from stagger_sqlite import durable
from stagger_sqlite.durable import HORIZON_AT, Horizon
from stagger_sqlite.wakeup import listen, unlisten

CTX = multiprocessing.get_context("spawn")


def _write_in_child(path, n, out):
    with StaggerQueue(path) as q:
        out.put([q.write({"i": i}) for i in range(n)])


def write_in_other_process(path, n):
    out = CTX.Queue()
    p = CTX.Process(target=_write_in_child, args=(path, n, out))
    p.start()
    seqs = out.get(timeout=60)
    p.join(60)
    assert p.exitcode == 0
    return seqs


@pytest.fixture
def listening(qpath):
    """A consumer listens (as every consumer does from the moment it is
    made): writers publish their horizon, which is also their ring."""
    StaggerQueue(qpath).close()
    assert listen(qpath + ".lock")
    yield
    unlisten(qpath + ".lock")


def test_writer_publishes_what_it_made_durable(qpath, listening):
    seqs = write_in_other_process(qpath, 5)
    # A process that never wrote learns it from the lock file alone.
    h = Horizon(qpath)
    try:
        assert h._published() == seqs[-1] == 5
    finally:
        h.close()


def test_consumer_delivers_published_messages_without_an_fsync(qpath, listening):
    write_in_other_process(qpath, 3)
    with StaggerQueue(qpath) as q:
        assert [s for s, _ in q.consume(0, wait=False)] == [1, 2, 3]
        horizon = q._storage._horizon
        assert horizon.durable_seq == 3
        assert horizon._started == 0  # the published horizon sufficed


def test_consumer_beyond_the_horizon_fsyncs_itself(qpath):
    StaggerQueue(qpath).close()
    # A writer with durability="normal" publishes nothing: a full-mode
    # consumer must make what it reads durable before handing it out.
    with StaggerQueue(qpath, durability="normal") as w:
        w.write_many(list(range(4)))
        with StaggerQueue(qpath) as q:
            assert [s for s, _ in q.consume(0, wait=False)] == [1, 2, 3, 4]
            horizon = q._storage._horizon
            assert horizon._started == 1  # one fsync covered the whole page
            assert horizon.durable_seq == 4
            w.write(4)
            assert [s for s, _ in q.consume(4, wait=False)] == [5]
            assert horizon._started == 2


def test_horizon_of_another_boot_or_file_means_nothing(qpath, listening):
    write_in_other_process(qpath, 2)
    h = Horizon(qpath)
    try:
        assert h._published() == 2
        fd = os.open(qpath + ".lock", os.O_RDWR)
        try:
            good = os.pread(fd, 44, HORIZON_AT)
            boot, dev, ino, seq, crc = struct.unpack("16sQQqI", good)
            for forged in (
                struct.pack("16sQQq", b"x" * 16, dev, ino, 99),  # another boot
                struct.pack("16sQQq", boot, dev, ino + 1, 99),  # another file
            ):
                os.pwrite(fd, forged + struct.pack("I", zlib.crc32(forged)), HORIZON_AT)
                assert h._published() == 0
            torn = struct.pack("16sQQq", boot, dev, ino, 99)
            os.pwrite(fd, torn + struct.pack("I", zlib.crc32(torn) ^ 1), HORIZON_AT)
            assert h._published() == 0
        finally:
            os.close(fd)
    finally:
        h.close()
    assert durable.BOOT_ID is not None  # Linux: the boot id is what ties a horizon to this boot


def test_without_a_consumer_nothing_is_published(qpath):
    """No consumer anywhere: no ring, no horizon. The consumer that comes
    later makes what it finds durable itself, once for the whole backlog."""
    StaggerQueue(qpath).close()
    write_in_other_process(qpath, 6)
    h = Horizon(qpath)
    try:
        assert h._published() == 0
    finally:
        h.close()
    with StaggerQueue(qpath) as q:
        assert [s for s, _ in q.consume(0, wait=False, batch=2)] == [1, 2, 3, 4, 5, 6]
        assert q._storage._horizon._started == 1


def test_new_queue_file_forgets_the_old_horizon(qpath, listening):
    write_in_other_process(qpath, 7)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(qpath + suffix):
            os.unlink(qpath + suffix)
    # The lock file stays; the new file starts from nothing.
    with StaggerQueue(qpath) as q:
        h = Horizon(qpath)
        try:
            assert h._published() == 0
            assert q.write("a") == 1
            assert h._published() == 1
        finally:
            h.close()


@pytest.mark.parametrize("threads", [1, 8])
def test_every_returned_write_was_covered_by_an_fsync(qpath, threads):
    """Each write returns only after an fsync that began after its commit:
    counted by the horizon, per process, with threads sharing fsyncs."""
    import threading

    with StaggerQueue(qpath) as q:
        horizon = q._storage._horizon
        seen = []

        def writer():
            for i in range(50):
                seq = q.write(i)
                assert horizon.durable_seq >= seq
                seen.append(seq)

        ts = [threading.Thread(target=writer) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert sorted(seen) == list(range(1, 50 * threads + 1))
        # Shared: never more fsyncs than writes; with 8 threads, fewer.
        assert horizon._started <= 50 * threads
        if threads > 1:
            assert horizon._started < 50 * threads


def test_failed_fsync_raises_and_says_the_message_is_stored(qpath):
    """An fsync error (EIO from a failing disk) cannot be undone: the commit
    is already visible. The write raises StaggerError saying so, the message
    is there, and the horizon does not claim it durable. The error comes
    from the real syscall: the WAL descriptor is swapped for a pipe's, on
    which fdatasync fails (EINVAL) as it would on a failing disk (EIO)."""
    from stagger_sqlite import StaggerError

    with StaggerQueue(qpath) as q:
        assert q.write("first") == 1
        horizon = q._storage._horizon
        wal_fd = horizon._wal_fd
        r, w = os.pipe()
        horizon._wal_fd = r
        try:
            with pytest.raises(StaggerError, match="fsync of the WAL failed.*may not survive a power cut") as info:
                q.write("second")
            assert qpath in str(info.value)
            assert horizon.durable_seq == 1
        finally:
            horizon._wal_fd = wal_fd
            os.close(r)
            os.close(w)
        assert [m for _, m in q.consume(0, wait=False)] == ["first", "second"]
        assert q.write("third") == 3
        assert horizon.durable_seq == 3


# -- the WAL's working size, given up front ----------------------------------


def test_full_mode_gives_the_wal_its_working_size_at_the_first_write(tmp_path):
    """An fsync of a WAL that grew also commits its new size to the file
    system's journal: a full-mode writer extends the WAL with zeros to the
    size a checkpoint lets SQLite reuse it at, before its first commit.
    Zeros past the frames are never read as frames: the queue reads back
    whole, in this process and in others, and after a kill -9."""
    from stagger_sqlite.schema import JOURNAL_SIZE_LIMIT

    full, normal = str(tmp_path / "full.db"), str(tmp_path / "normal.db")
    with StaggerQueue(full) as q, StaggerQueue(normal, durability="normal") as n:
        assert q.write({"i": 0}) == 1 and n.write({"i": 0}) == 1
        assert os.path.getsize(full + "-wal") == JOURNAL_SIZE_LIMIT
        assert os.path.getsize(normal + "-wal") < JOURNAL_SIZE_LIMIT, "normal mode has no fsync to spare"
        assert q.write_many([{"i": i} for i in range(1, 100)])[-1] == 100
    assert write_in_other_process(full, 5) == [101, 102, 103, 104, 105]
    with StaggerQueue(full) as q:
        assert [m["i"] for _, m in q.consume(0, wait=False)] == list(range(100)) + list(range(5))
    assert os.path.getsize(full + "-wal") == JOURNAL_SIZE_LIMIT, "a larger WAL is left as it is"

