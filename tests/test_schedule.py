"""schedule(msg, delay=|at=): delayed messages that become messages when due."""

import datetime
import subprocess
import sys
import threading
import time

import pytest

from stagger_sqlite import StaggerQueue


DEADLINE = 60


def test_schedule_needs_exactly_one_of_delay_and_at(qpath):
    with StaggerQueue(qpath) as q:
        with pytest.raises(ValueError, match="exactly one"):
            q.schedule("x")
        with pytest.raises(ValueError, match="exactly one"):
            q.schedule("x", delay=1, at=time.time() + 1)
        with pytest.raises(ValueError, match="naive"):
            q.schedule("x", at=datetime.datetime.now())
        for bad in (-1, "5", True, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="delay"):
                q.schedule("x", delay=bad)
        for bad in ("tomorrow", True, float("nan"), datetime.date(2030, 1, 1)):
            with pytest.raises(ValueError, match="at"):
                q.schedule("x", at=bad)
        assert q.stats()["scheduled"] == 0 and q.last_seq == 0


def test_schedule_returns_an_entry_id_and_stays_invisible_until_due(qpath):
    with StaggerQueue(qpath) as q:
        first = q.schedule("later", delay=3600)
        second = q.schedule("later", at=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1))
        assert second > first
        assert q.write("now") == 1
        assert len(q) == 1 and q.last_seq == 1
        assert list(q.consume(wait=False)) == [(1, "now")]


def test_scheduled_messages_appear_in_due_order_with_seqnos_at_their_time(qpath):
    now = time.time()
    with StaggerQueue(qpath) as q:
        q.schedule("c", at=now + 0.9)
        q.schedule("a", delay=0.3)
        q.schedule("b", at=datetime.datetime.fromtimestamp(now + 0.6, datetime.timezone.utc))
        q.write("first")
        got = []
        for seq, msg in q.consume(wait=DEADLINE):
            got.append((seq, msg, time.time()))
            if len(got) == 4:
                break
    assert [(s, m) for s, m, _ in got] == [(1, "first"), (2, "a"), (3, "b"), (4, "c")]
    # Never delivered before its due time.
    for (_, _, at), due in zip(got[1:], (now + 0.3, now + 0.6, now + 0.9)):
        assert at >= due


def test_a_past_due_time_is_promoted_at_once(qpath):
    with StaggerQueue(qpath) as q:
        q.schedule("late", at=time.time() - 60)
        q.schedule("zero", delay=0)
        assert list(q.consume(wait=False)) == [(1, "late"), (2, "zero")]


def test_due_entries_go_before_the_write_that_promotes_them(qpath):
    with StaggerQueue(qpath) as q:
        q.schedule("due", delay=0.05)
        time.sleep(0.1)
        p = subprocess.run(
            [sys.executable, "-c", "import sys\nfrom stagger_sqlite import StaggerQueue\n"
             "print(StaggerQueue(sys.argv[1]).write('plain'))", qpath],
            capture_output=True, text=True, timeout=DEADLINE)
        assert p.stdout.strip() == "2", p.stderr
        assert list(q.consume(wait=False)) == [(1, "due"), (2, "plain")]


def test_scheduled_entries_survive_reopening(qpath):
    with StaggerQueue(qpath) as q:
        q.schedule("kept", delay=0.3)
        q.schedule("far", delay=3600)
    time.sleep(0.4)
    with StaggerQueue(qpath) as q:
        assert list(q.consume(wait=False)) == [(1, "kept")]
        assert q.stats()["scheduled"] == 1
    with StaggerQueue(qpath) as q:
        assert q.last_seq == 1 and q.stats()["scheduled"] == 1


WAITING_CONSUMER = """
import sys, time
from stagger_sqlite import StaggerQueue
with StaggerQueue(sys.argv[1]) as q:
    print("ready", flush=True)
    for seq, msg in q.consume(wait=True):
        print(seq, msg, time.time(), flush=True)
        break
"""


def test_a_waiting_consumer_process_wakes_for_a_due_message(qpath):
    StaggerQueue(qpath).close()
    p = subprocess.Popen([sys.executable, "-c", WAITING_CONSUMER, qpath],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    with StaggerQueue(qpath) as q:
        due = time.time() + 0.5
        q.schedule("wake", at=due)
    # Nobody writes any more: the waiting consumer promotes it itself.
    out, err = p.communicate(timeout=DEADLINE)
    assert p.returncode == 0, err
    seq, msg, at = out.split()
    assert (seq, msg) == ("1", "wake") and float(at) >= due


def test_many_waiting_consumers_promote_each_due_message_once(qpath):
    q = StaggerQueue(qpath)
    results = [[] for _ in range(3)]

    def run(out):
        with StaggerQueue(qpath) as mine:
            for seq, msg in mine.consume(wait=DEADLINE):
                out.append((seq, msg))
                if len(out) == 5:
                    break

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in results]
    for t in threads:
        t.start()
    for i in range(5):
        q.schedule(i, delay=0.1 + i * 0.05)
    for t in threads:
        t.join(DEADLINE)
    for r in results:
        assert r == [(i + 1, i) for i in range(5)]
    assert q.last_seq == 5 and q.stats()["scheduled"] == 0
    q.close()


def test_figures_do_not_wait_for_a_writer_to_promote_a_due_message(qpath):
    """len/last_seq/stats promote due entries first, but never queue for the
    writer lock to do it: while someone writes they show what is stored."""
    import filelock

    from .helpers import wait_for

    with StaggerQueue(qpath, timeout=120) as q:
        q.write("now")
        q.schedule("due", delay=0.05)
        time.sleep(0.1)  # due, and no write since: not promoted yet
        figures = []
        with filelock.FileLock(qpath + ".lock"):  # another writer, holding on
            t = threading.Thread(target=lambda: figures.append((len(q), q.last_seq, q.stats()["stored"])), daemon=True)
            t.start()
            wait_for(lambda: not t.is_alive(), 60, message="the figures, while the lock is held")
        assert figures == [(1, 1, 1)]
        assert (len(q), q.last_seq) == (2, 2)  # the lock free: promoted, counted
