"""Processes, threads and fork (SPEC §1, §2): concurrent producers lose and
duplicate nothing, the writer lock is filelock's, a queue survives fork."""

import multiprocessing
import os
import subprocess
import sys
import threading
import time

import pytest

from stagger_sqlite import LockTimeoutError, StaggerQueue

PER_PRODUCER = 300


def produce_simple(path, producer, count, start_event):
    start_event.wait(60)
    with StaggerQueue(path, durability="normal") as q:
        i = 0
        while i < count:
            if i % 7 == 0 and i + 3 <= count:  # a mix of single writes and batches
                q.write_many([[producer, i], [producer, i + 1], [producer, i + 2]])
                i += 3
            else:
                q.write([producer, i])
                i += 1


def test_four_producer_processes_lose_nothing_duplicate_nothing_keep_order(qpath):
    StaggerQueue(qpath).close()
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=produce_simple, args=(qpath, p, PER_PRODUCER, go)) for p in range(4)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with StaggerQueue(qpath) as q:
        rows = list(q.consume(wait=False))
        assert q.last_seq == 4 * PER_PRODUCER
    seqs = [s for s, _ in rows]
    assert seqs == list(range(1, 4 * PER_PRODUCER + 1))  # no gap, no duplicate
    for producer in range(4):
        mine = [i for _, (p, i) in rows if p == producer]
        assert mine == list(range(PER_PRODUCER))  # all of them, in their order


def test_eight_threads_through_one_object(qpath):
    with StaggerQueue(qpath) as q:
        errors = []

        def work(t):
            try:
                for i in range(100):
                    if i % 10 == 9:
                        q.write_many([[t, i, "a"], [t, i, "b"]])
                    else:
                        q.write([t, i])
                    if i % 25 == 0:
                        len(q), q.last_seq
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        rows = list(q.consume(wait=False))
        assert [s for s, _ in rows] == list(range(1, 8 * 110 + 1))
        for t in range(8):
            mine = [m[1:] for _, m in rows if m[0] == t]
            expected = []
            for i in range(100):
                expected += [[i, "a"], [i, "b"]] if i % 10 == 9 else [[i]]
            assert mine == expected


def test_threads_consuming_and_writing_one_object(qpath):
    with StaggerQueue(qpath) as q:
        seen = {}

        def consume(name):
            got = seen[name] = []
            for _, m in q.consume(wait=60, batch=3):
                got.append(m)
                if len(got) == 200:
                    return

        def write():
            for i in range(200):
                q.write(i)

        consumers = [threading.Thread(target=consume, args=(n,)) for n in range(3)]
        for t in consumers:
            t.start()
        write()
        for t in consumers:
            t.join(60)
        for n in range(3):
            assert seen[n] == list(range(200))


def test_lock_timeout_when_another_process_holds_the_writer_lock(qpath):
    """A real filelock.FileLock on <path>.lock in another process blocks our
    writers: interoperability with filelock, and LockTimeoutError with nothing
    written."""
    with StaggerQueue(qpath, timeout=0.5) as q:
        q.write("before")
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, filelock\n"
                f"with filelock.FileLock({qpath + '.lock'!r}):\n"
                "    print('held', flush=True)\n"
                "    sys.stdin.readline()\n",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout.readline().strip() == "held"
            start = time.monotonic()
            with pytest.raises(LockTimeoutError, match=r"\.lock") as e:
                q.write("blocked")
            assert time.monotonic() - start >= 0.5
            assert isinstance(e.value, TimeoutError)
            with pytest.raises(LockTimeoutError):
                q.write_many(["x", "y"])
            with pytest.raises(LockTimeoutError):
                q.purge()
            # reads need no lock
            assert len(q) == 1 and q.last_seq == 1
            assert [m for _, m in q.consume(wait=False)] == ["before"]
        finally:
            holder.stdin.write("\n")
            holder.stdin.flush()
            holder.wait(60)
        assert q.write("after") == 2  # nothing of the failed writes took a seqno
        assert [m for _, m in q.consume(wait=False)] == ["before", "after"]


def test_our_writers_block_a_filelock_user(qpath):
    """The other direction: while our write holds the lock, FileLock waits."""
    import filelock

    with StaggerQueue(qpath) as q:
        inside = threading.Event()
        release = threading.Event()

        def slow(conn):
            inside.set()
            release.wait(60)
            conn.execute("INSERT INTO messages (body) VALUES (x'f6')")

        t = threading.Thread(target=lambda: q._storage.write(slow))
        t.start()
        assert inside.wait(60)
        with pytest.raises(filelock.Timeout):
            filelock.FileLock(qpath + ".lock", timeout=0.2).acquire()
        release.set()
        t.join(60)
        with filelock.FileLock(qpath + ".lock", timeout=30):
            pass
        assert list(q.consume(wait=False)) == [(1, None)]


def test_a_write_waiting_for_the_writer_lock_does_not_stop_reads_in_other_threads(qpath):
    """While one thread's write waits for another process's writer (here a
    tool holding the lock file), the other threads of the process read and
    consume as usual; the write completes once the lock is free."""
    import filelock

    from .helpers import wait_for

    q = StaggerQueue(qpath, timeout=60)
    q.write("before")
    holder = filelock.FileLock(qpath + ".lock")
    holder.acquire()
    done = []
    writer = threading.Thread(target=lambda: done.append(q.write("after")), daemon=True)
    try:
        writer.start()
        wait_for(lambda: q._storage._leading, 30, message="the write to start")
        time.sleep(0.05)  # and to reach its wait (the test holds either way: the lock stays taken)
        # Each of these returns while the write still waits (the holder is
        # released only after them): before, they waited for the write.
        assert (len(q), q.last_seq) == (1, 1)
        assert [m for _, m in q.consume(wait=False)] == ["before"]
        assert q.stats()["stored"] == 1
        assert writer.is_alive() and not done
    finally:
        holder.release()
    writer.join(60)
    assert done == [2]
    q.close()


def test_a_long_local_read_does_not_keep_other_processes_from_writing(qpath):
    """A write of this process that got the writer lock while a long read of
    this process holds the connection lets the lock go until the read ends,
    rather than hold up every other process's writers meanwhile."""
    q = StaggerQueue(qpath, durability="normal", timeout=60)
    q.write(1)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import filelock, sys\nwith filelock.FileLock(sys.argv[1]):\n"
         "    print('held', flush=True)\n    sys.stdin.readline()", qpath + ".lock"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    writer = threading.Thread(target=lambda: q.write(2), daemon=True)
    writer.start()  # waits for the holder
    reading, release_reader = threading.Event(), threading.Event()

    def long_read(conn):
        reading.set()
        release_reader.wait(60)

    reader = threading.Thread(target=lambda: q._storage.read(long_read), daemon=True)
    reader.start()
    assert reading.wait(60)
    holder.communicate("go\n", timeout=60)  # our writer gets the lock, the mutex is the reader's
    other = ("import sys\nfrom stagger_sqlite import StaggerQueue\n"
             "print(StaggerQueue(sys.argv[1], durability='normal', timeout=10).write(3))")
    r = subprocess.run([sys.executable, "-c", other, qpath], capture_output=True, text=True, timeout=60)
    release_reader.set()
    assert r.returncode == 0, r.stderr  # not a LockTimeoutError after 10 s
    writer.join(60)
    reader.join(60)
    assert sorted(m for _, m in q.consume(wait=False)) == [1, 2, 3]
    q.close()


def test_timeout_none_waits_for_the_lock(qpath):
    with StaggerQueue(qpath, timeout=None) as q:
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys, filelock, time\n"
             f"with filelock.FileLock({qpath + '.lock'!r}):\n"
             "    print('held', flush=True)\n"
             "    time.sleep(0.5)\n"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout.readline().strip() == "held"
        assert q.write("waited") == 1
        holder.wait(60)


def test_a_write_from_a_forked_child(qpath):
    with StaggerQueue(qpath) as q:
        q.write("parent-before")
        c = q.consume(wait=False)
        assert next(c) == (1, "parent-before")
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                seq = q.write("child")
                ok = seq == 2 and [m for _, m in q.consume(wait=False)] == ["parent-before", "child"]
                q.close()
                code = 0 if ok else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert q.write("parent-after") == 3
        assert list(c) == [(2, "child"), (3, "parent-after")]
        assert len(q) == 3


def child_writes(q, n, results):
    try:
        results.put([q.write(["child", i]) for i in range(n)] + [q.last_seq])
    except Exception as e:  # report it to the parent
        results.put(repr(e))


def test_a_multiprocessing_fork_child_uses_a_queue_opened_in_the_parent(qpath):
    ctx = multiprocessing.get_context("fork")
    with StaggerQueue(qpath) as q:
        q.write("parent")
        results = ctx.Queue()
        procs = [ctx.Process(target=child_writes, args=(q, 20, results)) for _ in range(3)]
        for p in procs:
            p.start()
        got = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        assert all(isinstance(g, list) for g in got), got
        written = sorted(s for g in got for s in g[:-1])
        assert written == list(range(2, 62))
        assert q.write("parent-after") == 62
        assert len(q) == 62


def test_fork_while_another_thread_writes(qpath):
    """Forking while a sibling thread is writing: the child still works."""
    with StaggerQueue(qpath) as q:
        stop = threading.Event()

        def writer():
            while not stop.is_set():
                q.write("t")

        t = threading.Thread(target=writer)
        t.start()
        try:
            for _ in range(5):
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        q.write("child")
                        code = 0
                    finally:
                        os._exit(code)
                _, status = os.waitpid(pid, 0)
                assert os.waitstatus_to_exitcode(status) == 0
        finally:
            stop.set()
            t.join(60)
        assert sum(1 for _, m in q.consume(wait=False) if m == "child") == 5
        assert len(q) == q.last_seq


def test_len_and_last_seq_see_other_processes(qpath):
    with StaggerQueue(qpath) as q:
        assert q.last_seq == 0
        code = (
            "from stagger_sqlite import StaggerQueue\n"
            f"with StaggerQueue({qpath!r}) as q:\n"
            "    q.write_many(range(5)); q.purge(2)\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        assert q.last_seq == 5
        assert len(q) == 3
        assert q.stats()["stored"] == 3


def consume_until(path, n, out):
    with StaggerQueue(path) as q:
        got = []
        for seq, msg in q.consume(wait=60):
            got.append(seq)
            if len(got) == n:
                break
        out.put(got)


def test_consumer_processes_each_see_every_message_while_producers_write(qpath):
    StaggerQueue(qpath).close()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    go = ctx.Event()
    consumers = [ctx.Process(target=consume_until, args=(qpath, 400, out)) for _ in range(2)]
    producers = [ctx.Process(target=produce_simple, args=(qpath, p, 200, go)) for p in range(2)]
    for p in consumers + producers:
        p.start()
    go.set()
    results = [out.get(timeout=120) for _ in consumers]
    for p in consumers + producers:
        p.join(60)
        assert p.exitcode == 0
    for got in results:
        assert got == list(range(1, 401))


@pytest.mark.parametrize("durability", ["full", "normal"])
def test_a_writer_killed_mid_stream_loses_no_returned_write_and_frees_the_lock(qpath, durability):
    """kill -9 of a writer: every write it saw return is stored, and the next
    writer gets the lock at once (a flock dies with its process)."""
    StaggerQueue(qpath).close()
    code = (
        "import sys\nfrom stagger_sqlite import StaggerQueue\n"
        f"q = StaggerQueue({qpath!r}, durability={durability!r})\n"
        "i = 0\n"
        "while True:\n"
        "    seqs = q.write_many([i, i + 1]) if i % 3 else [q.write(i)]\n"
        "    print(*seqs, flush=True)\n"
        "    i += len(seqs)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    returned = []
    try:
        while len(returned) < 300:
            line = proc.stdout.readline()
            assert line, "writer died early"
            returned += [int(s) for s in line.split()]
    finally:
        proc.kill()
        rest = proc.stdout.read()
        proc.wait(60)
    returned += [int(s) for s in rest.split()]
    with StaggerQueue(qpath, timeout=10) as q:
        stored = [s for s, _ in q.consume(wait=False)]
        assert set(returned) <= set(stored)
        assert stored == list(range(1, len(stored) + 1))
        assert q.write("after") == len(stored) + 1


def test_a_foreign_sqlite_writer_is_a_lock_timeout_not_database_is_locked(qpath):
    """A program writing the file without our lock (plain SQLite) delays our
    writes; past the timeout they raise LockTimeoutError, never SQLite's
    "database is locked", and reads go on meanwhile."""
    import apsw

    with StaggerQueue(qpath, timeout=0.3) as q:
        q.write(1)
        other = apsw.Connection(qpath)
        other.execute("BEGIN IMMEDIATE")
        try:
            for attempt in (lambda: q.write(2), lambda: q.write_many([2, 3]), lambda: q.purge()):
                with pytest.raises(LockTimeoutError) as e:
                    attempt()
                assert "database is locked" not in str(e.value)
                assert qpath in str(e.value)
            assert len(q) == 1 and [m for _, m in q.consume(wait=False)] == [1]
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert q.write(2) == 2
