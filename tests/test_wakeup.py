"""Waiting consumers across processes: wait=True / wait=<seconds>, close()
from another thread, producers dying, the poll fallback."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from stagger_sqlite import StaggerQueue
from stagger_sqlite.wakeup import Waiter

from .helpers import wait_for

DEADLINE = 60


def produce(path, start, count):
    with StaggerQueue(path) as q:
        for i in range(start, start + count):
            q.write(i)


def run_python(code, *args, env=None):
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


PRODUCER = """
import sys
from stagger_sqlite import StaggerQueue
path, start, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with StaggerQueue(path) as q:
    for i in range(start, start + count):
        q.write(i)
"""

# Consumes with wait=True until `count` messages, prints them, exits.
CONSUMER = """
import sys
from stagger_sqlite import StaggerQueue
path, count = sys.argv[1], int(sys.argv[2])
with StaggerQueue(path) as q:
    print("ready", flush=True)
    got = []
    for seq, msg in q.consume(wait=True):
        got.append((seq, msg))
        if len(got) == count:
            break
    print(repr(got), flush=True)
"""


def consume_in_thread(q, count, **kwargs):
    got = []

    def run():
        for seq, msg in q.consume(**kwargs):
            got.append((seq, msg))
            if len(got) == count:
                break

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, got


def test_wait_true_receives_other_process_writes_in_order(qpath):
    q = StaggerQueue(qpath)
    t, got = consume_in_thread(q, 100, wait=True)
    p = run_python(PRODUCER, qpath, "0", "100")
    assert p.wait(DEADLINE) == 0, p.stderr.read()
    t.join(DEADLINE)
    assert not t.is_alive()
    assert got == [(i + 1, i) for i in range(100)]
    q.close()


def test_waiting_consumer_process_gets_writes_of_many_producers(qpath):
    StaggerQueue(qpath).close()
    consumer = run_python(CONSUMER, qpath, "150")
    assert consumer.stdout.readline().strip() == "ready"
    producers = [run_python(PRODUCER, qpath, str(k * 1000), "50") for k in range(3)]
    for p in producers:
        assert p.wait(DEADLINE) == 0, p.stderr.read()
    out, err = consumer.communicate(timeout=DEADLINE)
    assert consumer.returncode == 0, err
    got = eval(out.strip())
    assert [s for s, _ in got] == list(range(1, 151))
    for k in range(3):  # each producer's messages in its own order
        mine = [m for _, m in got if k * 1000 <= m < k * 1000 + 50]
        assert mine == list(range(k * 1000, k * 1000 + 50))


def test_close_from_another_thread_ends_a_waiting_consumer(qpath):
    q = StaggerQueue(qpath)
    q.write("only")
    t, got = consume_in_thread(q, 10, wait=True)
    wait_for(lambda: got, DEADLINE, message="first message")
    time.sleep(0.05)  # let it reach the wait (not required for correctness)
    q.close()
    t.join(DEADLINE)
    assert not t.is_alive()
    assert got == [(1, "only")]


def test_close_ends_a_consumer_waiting_with_a_timeout(qpath):
    q = StaggerQueue(qpath)
    done = threading.Event()

    def run():
        list(q.consume(wait=3600.0))
        done.set()

    threading.Thread(target=run, daemon=True).start()
    time.sleep(0.05)
    q.close()
    assert done.wait(DEADLINE)


def test_wait_seconds_stops_after_idle_time(qpath):
    with StaggerQueue(qpath) as q:
        q.write("a")
        started = time.monotonic()
        got = list(q.consume(wait=0.5))
        assert got == [(1, "a")]
        assert time.monotonic() - started >= 0.5


def test_wait_seconds_receives_writes_that_come_while_waiting(qpath):
    q = StaggerQueue(qpath)
    t, got = consume_in_thread(q, 3, wait=DEADLINE)
    for i in range(3):
        p = run_python(PRODUCER, qpath, str(i), "1")
        assert p.wait(DEADLINE) == 0
        wait_for(lambda: len(got) == i + 1, DEADLINE, message=f"message {i}")
    t.join(DEADLINE)
    assert got == [(1, 0), (2, 1), (3, 2)]
    q.close()


def test_wait_seconds_starts_counting_when_caught_up(qpath):
    with StaggerQueue(qpath) as q:
        q.write_many(range(3))
        c = q.consume(wait=0.2)
        assert next(c) == (1, 0)
        time.sleep(0.4)  # holding a message longer than `wait` is not idling
        assert [m for _, m in c] == [1, 2]


KILLED_PRODUCER = """
import sys
from stagger_sqlite import StaggerQueue
with StaggerQueue(sys.argv[1]) as q:
    i = 0
    while True:
        q.write(i)
        i += 1
"""


def test_producer_killed_mid_stream_does_not_break_waiters(qpath):
    q = StaggerQueue(qpath)
    got = []
    stop = threading.Event()

    def run():
        for seq, msg in q.consume(wait=True):
            got.append((seq, msg))
            if msg == "after":
                stop.set()
                break

    t = threading.Thread(target=run, daemon=True)
    t.start()
    for _ in range(2):
        p = run_python(KILLED_PRODUCER, qpath)
        wait_for(lambda: len(got) > 20, DEADLINE, message="messages from the producer")
        os.kill(p.pid, signal.SIGKILL)
        p.wait(DEADLINE)
    p = run_python("import sys\nfrom stagger_sqlite import StaggerQueue\nStaggerQueue(sys.argv[1]).write('after')", qpath)
    assert p.wait(DEADLINE) == 0
    assert stop.wait(DEADLINE)
    t.join(DEADLINE)
    seqs = [s for s, _ in got]
    assert seqs == list(range(1, len(seqs) + 1))
    assert got[-1][1] == "after"
    q.close()


def test_poll_fallback_still_delivers(qpath):
    StaggerQueue(qpath).close()
    env = dict(os.environ, STAGGER_SQLITE_WAKEUP="poll")
    consumer = run_python(CONSUMER, qpath, "20", env=env)
    assert consumer.stdout.readline().strip() == "ready"
    produce(qpath, 0, 20)
    out, err = consumer.communicate(timeout=DEADLINE)
    assert consumer.returncode == 0, err
    assert eval(out.strip()) == [(i + 1, i) for i in range(20)]


def test_waiter_interface_for_timed_waits(qpath):
    # The groups layer waits with a timeout it computes (lease expiry, retry).
    with StaggerQueue(qpath) as q:
        w = Waiter(q._storage)
        assert w.wait(0.05) is True  # timeout: not closed
        q.write("x")
        assert w.wait(DEADLINE) is True  # the ring
        w.reset()
        w.close()
        w2 = Waiter(q._storage)
    assert w2.wait(DEADLINE) is False  # the queue was closed


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_closing_a_waiter_ends_its_wait_in_another_thread(qpath, monkeypatch, mode):
    # A consumer closed while it waits stops now, not at the safety poll
    # (made an hour here, so only the close can end the wait).
    from stagger_sqlite import wakeup

    monkeypatch.setattr(wakeup, "SAFETY_POLL", 3600.0)
    monkeypatch.setattr(wakeup, "MAX_POLL", 3600.0)
    if mode == "poll":
        monkeypatch.setattr(wakeup, "_hub", lambda: None)
    with StaggerQueue(qpath) as q:
        w = Waiter(q._storage)
        assert (w._channel is None) == (mode == "poll")
        returned = []

        def wait_until_false():  # True: a spurious wake-up (the listening grace)
            while w.wait(None):
                pass
            returned.append(False)

        t = threading.Thread(target=wait_until_false, daemon=True)
        t.start()
        time.sleep(0.05)  # close before or during the wait: both must end it
        w.close()
        t.join(DEADLINE)
        assert returned == [False]
        assert w.wait(None) is False  # and any later wait ends at once


def test_consumer_made_before_fork_waits_in_the_child(qpath):
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    q = StaggerQueue(qpath)
    c = q.consume(wait=True)
    q.write("warm")  # the parent's hub is running
    assert next(c) == (1, "warm")
    pid = os.fork()
    if pid == 0:  # child: wait for the parent's next write
        code = 1
        try:
            if next(c) == (2, "from parent"):
                code = 0
        finally:
            os._exit(code)
    time.sleep(0.1)
    q.write("from parent")
    deadline = time.monotonic() + DEADLINE
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        assert time.monotonic() < deadline, "child never got the message"
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0
    q.close()


def test_a_waiter_collected_while_its_hub_is_locked_does_not_deadlock(qpath):
    # A GC pass may finalize a forgotten consumer (and its Waiter) in any
    # thread at any allocation, including the hub thread while it holds its
    # lock; giving the watch back must not need that lock.
    import gc

    from stagger_sqlite import wakeup

    with StaggerQueue(qpath) as q:
        w = Waiter(q._storage)
        hub = wakeup._HUB
        if hub is None:
            pytest.skip("no inotify here")
        cycle = [w]
        cycle.append(cycle)
        del w, cycle
        done = threading.Event()

        def collect_under_lock():
            with hub.lock:
                gc.collect()
            done.set()

        threading.Thread(target=collect_under_lock, daemon=True).start()
        assert done.wait(DEADLINE), "finalizer deadlocked on the hub lock"
        q.write("still works")
        assert list(q.consume(wait=False)) == [(1, "still works")]


def test_close_while_a_consumer_is_busy_reading_ends_it_quietly(tmp_path):
    # Not only a consumer asleep in its wait: one caught between a read and
    # the next must also just stop, never raise QueueClosedError.
    for i in range(10):
        q = StaggerQueue(str(tmp_path / f"q{i}.db"))
        q.write_many(range(200))
        errors = []
        got = []

        def run():
            try:
                for seq, msg in q.consume(batch=1, wait=True):
                    got.append(seq)
            except Exception as e:  # noqa: BLE001 - the test reports it
                errors.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        wait_for(lambda: len(got) > i * 10, DEADLINE, message="consumer reading")
        q.close()
        t.join(DEADLINE)
        assert not t.is_alive() and errors == []


# -- listening: writers ring only while some consumer exists ------------------


def listener_seen(path):
    """Whether another open file description holds the listener byte."""
    from stagger_sqlite.lock import LISTENER_BYTE, WriterLock

    lock = WriterLock(path + ".lock", 0o600)
    try:
        return lock._test(LISTENER_BYTE, 1) is not None
    finally:
        lock.close()


def test_a_consumer_listens_from_its_making_to_its_close(qpath):
    StaggerQueue(qpath).close()
    assert not listener_seen(qpath)
    with StaggerQueue(qpath) as q:
        c1 = q.consume(0, wait=False)
        c2 = q.consume(0, wait=False)
        assert listener_seen(qpath)
        c1.close()
        assert listener_seen(qpath), "one consumer is left"
        c2.close()
        assert not listener_seen(qpath)
        c3 = q.consume(0, wait=False)
        assert listener_seen(qpath)
        del c3  # dropped without close: its finalizer stops listening
        import gc

        gc.collect()
        assert not listener_seen(qpath)


def test_a_forked_child_listens_for_the_consumer_it_inherited(qpath):
    """A child's consumers are its own: after the fork the child closes the
    listening descriptors it inherited and its inherited consumer listens
    anew once it waits, so rings reach it after the parent stopped
    listening."""
    import multiprocessing as mp

    StaggerQueue(qpath).close()
    q = StaggerQueue(qpath)
    consumer = q.consume(0, wait=2.0)
    ctx = mp.get_context("fork")
    waiting, got = ctx.Event(), ctx.Queue()

    def child():
        waiting.set()
        got.put([s for s, _ in consumer])

    p = ctx.Process(target=child)
    p.start()
    assert waiting.wait(60)
    consumer.close()  # the parent no longer listens; the child does
    wait_for(lambda: listener_seen(qpath), message="the child listens")
    produce(qpath, 0, 1)
    assert got.get(timeout=60) == [1]
    p.join(60)
    assert p.exitcode == 0
    q.close()
    wait_for(lambda: not listener_seen(qpath), message="nobody listens once the child is gone")


def test_a_new_waiters_first_wait_ends_after_the_listen_grace(qpath):
    """A writer whose last look found no consumer does not look (nor ring)
    for SLICE seconds; so a consumer that has just started listening does
    not trust rings alone until LISTEN_GRACE has passed: its first wait
    ends by then. Later waits sleep until a ring or their timeout."""
    from stagger_sqlite.wakeup import LISTEN_GRACE, SAFETY_POLL

    with StaggerQueue(qpath) as q:
        w = Waiter(q._storage)
        t0 = time.monotonic()
        assert w.wait(DEADLINE) is True
        assert time.monotonic() - t0 < SAFETY_POLL / 4, "the first wait ended with the grace, not the safety poll"
        while time.monotonic() < t0 + LISTEN_GRACE:
            pass
        t1 = time.monotonic()
        assert w.wait(0.2) is True
        assert time.monotonic() - t1 >= 0.19, "past the grace, a wait without a ring lasts its timeout"
        w.close()


@pytest.mark.parametrize("durability", ["full", "normal"])
def test_a_consumer_starting_while_a_lone_producer_writes_gets_the_next_write_at_once(qpath, durability):
    """A producer with no consumer about looks for listeners at most once
    per SLICE. A consumer that starts meanwhile, catches up and waits must
    still get the producer's next write promptly, not at the one-second
    safety poll. The producer writes until it sees the consumer listening,
    then once more (inside its quiet window, as likely as not) and stops."""
    from stagger_sqlite.wakeup import SAFETY_POLL

    with StaggerQueue(qpath, durability=durability) as producer:
        for _ in range(10):
            start = producer.write("warm")
            got = {}

            def consume():
                with StaggerQueue(qpath, durability=durability) as q:
                    for seq, msg in q.consume(ack=start, wait=DEADLINE):
                        if msg == "marker":
                            got["at"] = time.monotonic()
                            return

            t = threading.Thread(target=consume, daemon=True)
            t.start()
            deadline = time.monotonic() + DEADLINE
            while not listener_seen(qpath):
                producer.write("warm")
                assert time.monotonic() < deadline, "the consumer never listened"
            producer.write("marker")
            written = time.monotonic()
            t.join(DEADLINE)
            assert "at" in got
            assert got["at"] - written < SAFETY_POLL / 4, "the consumer slept until its safety poll"
