"""Group commit: threads of one process writing at once share transactions
and fsyncs, and each still gets exactly the outcome of its own write.

Batches are forced where a test needs one: the writer lock is held from
outside (a ``filelock.FileLock`` on ``<path>.lock``, as another tool would
take it) while the threads queue up behind it.
"""

import subprocess
import sys
import textwrap
import threading

import filelock
import pytest

from stagger_sqlite import EncodeError, StaggerQueue, StorageFullError

from .helpers import wait_for

THREADS = 8


def run_threads(target, n=THREADS):
    errors = []

    def guarded(k):
        try:
            target(k)
        except BaseException as e:  # surfaced below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors


def queued_writers(q, count):
    """Wait until ``count`` writers of ``q`` wait behind the current one."""
    wait_for(lambda: len(q._storage._pending) >= count, message=f"{count} queued writers")


def stored(q):
    return {seq: msg for seq, msg in q.consume(wait=False)}


def test_threads_get_distinct_seqnos_and_batches_stay_consecutive(qpath):
    per = 40
    got = {}
    with StaggerQueue(qpath) as q:

        def writer(k):
            mine = []
            for i in range(per):
                if i % 4 == 3:
                    seqs = q.write_many([{"t": k, "i": i, "part": p} for p in range(3)])
                    assert seqs == list(range(seqs[0], seqs[0] + 3)), "a write_many's seqnos are consecutive"
                    mine += seqs
                else:
                    mine.append(q.write({"t": k, "i": i}))
            got[k] = mine

        run_threads(writer)
        all_seqs = [s for seqs in got.values() for s in seqs]
        assert len(all_seqs) == len(set(all_seqs))
        assert sorted(all_seqs) == list(range(1, len(all_seqs) + 1))
        assert q.last_seq == len(all_seqs) == len(q)
        for k, seqs in got.items():
            assert seqs == sorted(seqs), "one thread's writes are ordered"
        messages = stored(q)
        for k, seqs in got.items():
            assert {messages[s]["t"] for s in seqs} == {k}, "each seqno holds the message its writer wrote"


CHECKER = """
import sys
from stagger_sqlite import StaggerQueue
q = StaggerQueue(sys.argv[1], durability="full")
for line in sys.stdin:
    seq = int(line)
    rows = q.read_page(seq - 1, 1)
    print("yes" if rows and rows[0][0] == seq else "no", flush=True)
"""


def test_each_returned_write_is_readable_by_another_process_at_once(qpath):
    StaggerQueue(qpath).close()
    checker = subprocess.Popen(
        [sys.executable, "-c", CHECKER, qpath], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    asked = threading.Lock()
    answers = []
    try:
        with StaggerQueue(qpath) as q:

            def writer(k):
                for i in range(25):
                    seq = q.write({"t": k, "i": i})
                    with asked:
                        checker.stdin.write(f"{seq}\n")
                        checker.stdin.flush()
                        answers.append((seq, checker.stdout.readline().strip()))

            run_threads(writer)
    finally:
        checker.stdin.close()
        checker.wait(60)
    assert len(answers) == THREADS * 25
    assert [seq for seq, a in answers if a != "yes"] == []


def test_an_encode_error_in_one_thread_does_not_affect_the_others(qpath):
    outcomes = {"ok": [], "refused": 0}
    lock = threading.Lock()
    with StaggerQueue(qpath) as q:

        def writer(k):
            for i in range(30):
                if k == 0 and i % 2 == 0:
                    with pytest.raises(EncodeError):
                        q.write({"bad": object()})
                    with lock:
                        outcomes["refused"] += 1
                else:
                    seq = q.write({"t": k, "i": i})
                    with lock:
                        outcomes["ok"].append(seq)

        run_threads(writer)
        assert outcomes["refused"] == 15
        assert len(q) == len(outcomes["ok"]) == THREADS * 30 - 15
        assert sorted(outcomes["ok"]) == list(range(1, len(outcomes["ok"]) + 1)), "no seqno lost to a refused write"


def test_a_writer_failing_inside_a_shared_transaction_fails_alone(qpath):
    """A batch of 7 writers, one of which raises after inserting: only that
    one sees the error and only its row is undone."""
    results = {}
    with StaggerQueue(qpath, timeout=60) as q:
        outside = filelock.FileLock(qpath + ".lock")
        outside.acquire()
        try:

            def writer(k):
                if k == 3:
                    def insert_then_fail(conn):
                        conn.execute("INSERT INTO messages (body) VALUES (x'00')")
                        raise ValueError("changed my mind")

                    with pytest.raises(ValueError, match="changed my mind"):
                        q._storage.write(insert_then_fail)
                    results[k] = "failed"
                else:
                    results[k] = q.write({"t": k})

            threads = [threading.Thread(target=writer, args=(k,)) for k in range(THREADS)]
            for t in threads:
                t.start()
            queued_writers(q, THREADS - 1)  # one leads (blocked on the lock), 7 queue behind it
        finally:
            outside.release()
        for t in threads:
            t.join(60)
        assert results[3] == "failed"
        seqs = sorted(v for k, v in results.items() if k != 3)
        assert len(seqs) == THREADS - 1
        messages = stored(q)
        assert sorted(messages) == seqs
        assert {m["t"] for m in messages.values()} == set(range(THREADS)) - {3}


def test_a_failed_shared_transaction_fails_every_writer_in_it(qpath):
    """The disk (here: SQLite's page limit) fills in the middle of a shared
    transaction: every writer in it gets StorageFullError, nothing of theirs
    is stored, and the queue goes on working once there is room."""
    big = "x" * 1500
    outcomes = {}
    with StaggerQueue(qpath, timeout=60) as q:
        q.write({"warm": "up"})
        pages = q._storage.read(lambda c: c.execute("PRAGMA page_count").fetchall()[0][0])
        # Room for a few big messages one by one, not for the batch of seven.
        q._storage.read(lambda c: c.execute(f"PRAGMA max_page_count = {pages + 2}").fetchall())
        outside = filelock.FileLock(qpath + ".lock")
        outside.acquire()
        try:

            def writer(k):
                try:
                    outcomes[k] = q.write({"t": k, "text": big})
                except StorageFullError as e:
                    outcomes[k] = e

            threads = [threading.Thread(target=writer, args=(k,)) for k in range(THREADS)]
            for t in threads:
                t.start()
            queued_writers(q, THREADS - 1)
        finally:
            outside.release()
        for t in threads:
            t.join(60)
        failed = [k for k, v in outcomes.items() if isinstance(v, StorageFullError)]
        done = {k: v for k, v in outcomes.items() if isinstance(v, int)}
        assert len(outcomes) == THREADS
        assert len(failed) == THREADS - 1, "the shared transaction of seven failed as a whole"
        assert len(done) == 1, "the writer that led alone had room"
        messages = stored(q)
        assert sorted(messages) == [1] + sorted(done.values())
        assert {messages[s]["t"] for s in done.values()} == set(done)
        q._storage.read(lambda c: c.execute("PRAGMA max_page_count = 1073741823").fetchall())
        seq = q.write({"after": "room"})
        assert stored(q)[seq] == {"after": "room"}


def performance_blocks():
    """The ``.. code-block:: python`` examples of README's Performance section
    (they sit inside list items, so they are dedented by their own indent)."""
    from .test_readme import README, sections

    with open(README) as f:
        lines = sections(f.read())["Performance"].splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() == ".. code-block:: python":
            indent = len(line) - len(line.lstrip())
            block = []
            for body in lines[i + 1:]:
                if body.strip() and len(body) - len(body.lstrip()) <= indent:
                    break
                block.append(body)
            blocks.append(textwrap.dedent("\n".join(block)))
    return blocks


def test_the_readme_performance_examples_work_when_pasted(tmp_path, monkeypatch):
    blocks = performance_blocks()
    assert blocks, "the Performance section shows group commit in code"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.rst (Performance)", "exec"), {"__name__": "__readme__"})


def test_a_write_inside_a_write_is_refused_not_deadlocked(qpath):
    with StaggerQueue(qpath) as q:
        with pytest.raises(RuntimeError, match="cannot start another write"):
            q._storage.write(lambda conn: q.write({"nested": True}))
        assert len(q) == 0
        assert q.write({"after": True}) == 1


def test_the_timeout_bounds_a_write_waiting_behind_another_thread_of_the_process(qpath):
    """SPEC section 1: a write waits at most `timeout` for the writer lock.
    Held by another thread of the same process (leading a long write), the
    wait is in the group-commit queue: it times out there too, nothing of
    the late write is stored, and the long write goes on unharmed."""
    import cbor2

    from stagger_sqlite import LockTimeoutError

    with StaggerQueue(qpath, timeout=0.3) as q:
        inside, release = threading.Event(), threading.Event()

        def hold(conn):  # a long transaction of another thread
            inside.set()
            release.wait(30)
            return q._append(conn, [cbor2.dumps("held")])

        releaser = threading.Timer(10, release.set)  # without the timeout, the late write returns then
        releaser.start()
        holder = threading.Thread(target=q._storage.write, args=(hold,), kwargs={"appends": True})
        holder.start()
        try:
            assert inside.wait(10)
            with pytest.raises(LockTimeoutError, match="another thread"):
                q.write("late")
            assert not release.is_set()  # it gave up while the lock was still held
        finally:
            release.set()
            releaser.cancel()
            holder.join(30)
        assert [m for _, m in q.consume(wait=False)] == ["held"]
        assert q.write("now") == 2
